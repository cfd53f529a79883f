"""What `cxrnode status` (and later the admin API) reports: counts by state."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from cxrnode.db import (
    Instance,
    InstanceState,
    Job,
    JobState,
    Output,
    OutputState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
)
from cxrnode.jobs.broker import queue_depths, redis_client
from cxrnode.jobs.tracking import live_workers
from cxrnode.retention import retention_counts
from cxrnode.settings import Settings


def _counts(session: Any, column: Any, states: type) -> dict[str, int]:
    counts = {state.value: 0 for state in states}
    for state, count in session.execute(select(column, func.count()).group_by(column)):
        counts[str(state.value if hasattr(state, "value") else state)] = count
    return counts


def collect_status(settings: Settings) -> dict[str, Any]:
    """Counts by state from the database; queue depths and live workers from the broker."""
    engine = make_engine(settings.effective_database_url, read_only=True)
    try:
        with make_sessionmaker(engine)() as session:
            report: dict[str, Any] = {
                "instances": _counts(session, Instance.state, InstanceState),
                "studies": _counts(session, Study.state, StudyState),
                "jobs": _counts(session, Job.state, JobState),
                "outputs": _counts(session, Output.state, OutputState),
            }
            report["dead_letters"] = _dead_letters(session)
            report["retention"] = {
                "days": settings.retention_days,
                **retention_counts(session),
            }
    finally:
        engine.dispose()
    report["queues"] = queue_depths(settings)
    report["workers"] = _live_workers(settings)
    return report


def _live_workers(settings: Settings) -> list[dict[str, Any]] | None:
    """Workers whose heartbeat is alive, in both modes (None: the broker cannot be asked)."""
    try:
        client = redis_client(settings, timeout=2)
        try:
            workers = live_workers(client)
        finally:
            client.close()
    except Exception:
        return None
    return [
        {
            "name": w.name,
            "queues": list(w.queues),
            "host": w.host,
            "pid": w.pid,
            "jobs": len(w.held),
            **w.state,
        }
        for w in workers
    ]


def _dead_letters(session: Any, limit: int = 50) -> list[dict[str, Any]]:
    """The newest outputs that gave up, with what `cxrnode resend --output ID` needs."""
    rows = session.scalars(
        select(Output)
        .where(Output.state == OutputState.dead)
        .order_by(Output.updated_at.desc())
        .limit(limit)
    )
    return [
        {
            "id": row.id,
            "kind": row.kind,
            "destination": row.destination,
            "attempts": row.attempts,
            "last_status": row.last_status,
            "last_error": row.last_error,
        }
        for row in rows
    ]


def render_status(report: dict[str, Any]) -> str:
    lines = []
    for section in ("instances", "studies", "jobs", "outputs", "queues"):
        if section not in report:
            continue
        values = report[section]
        parts = ", ".join(f"{k} {v}" for k, v in values.items())
        lines.append(f"{section:<10} {parts or '-'}")
    for dead in report.get("dead_letters", []):
        lines.append(
            f"{'dead':<10} output {dead['id']} ({dead['kind']}) to {dead['destination']}: "
            f"{dead['last_error'] or dead['last_status']} - `cxrnode resend --output {dead['id']}`"
        )
    retention = report.get("retention")
    if retention:
        kept = f"kept {retention['days']:g} days after delivery" if retention["days"] else "off"
        lines.append(
            f"{'retention':<10} {kept}; purged studies {retention['purged_studies']}, "
            f"instances {retention['purged_instances']}, outputs {retention['purged_outputs']}"
            f" ({retention['purged_instance_bytes'] / 1e6:.1f} MB received)"
            + (f", last {retention['last_purge']}" if retention["last_purge"] else "")
        )
    workers = report.get("workers")
    if workers is None:
        lines.append(f"{'workers':<10} unknown (the broker does not answer)")
    elif not workers:
        lines.append(f"{'workers':<10} none alive")
    for worker in workers or []:
        model = f", model {worker['model']}" if worker.get("model") else ""
        if worker.get("model_hash"):
            model += f" {str(worker['model_hash'])[:12]}"
        lines.append(
            f"{'worker':<10} {worker['name']}: {','.join(worker['queues'])}, "
            f"{worker['jobs']} jobs held{model}"
        )
    return "\n".join(lines)

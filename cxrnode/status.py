"""What `cxrnode status` (and later the admin API) reports: counts by state."""

from __future__ import annotations

from datetime import timedelta
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
    utcnow,
)
from cxrnode.jobs.broker import queue_depths
from cxrnode.settings import Settings


def _counts(session: Any, column: Any, states: type) -> dict[str, int]:
    counts = {state.value: 0 for state in states}
    for state, count in session.execute(select(column, func.count()).group_by(column)):
        counts[str(state.value if hasattr(state, "value") else state)] = count
    return counts


def collect_status(settings: Settings, *, ping_workers: bool = True) -> dict[str, Any]:
    """Counts by state from the database, queue depths from the broker, workers seen."""
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            report: dict[str, Any] = {
                "instances": _counts(session, Instance.state, InstanceState),
                "studies": _counts(session, Study.state, StudyState),
                "jobs": _counts(session, Job.state, JobState),
                "outputs": _counts(session, Output.state, OutputState),
            }
            workers = _workers_from_jobs(session)
            report["dead_letters"] = _dead_letters(session)
    finally:
        engine.dispose()
    report["queues"] = queue_depths(settings)
    if ping_workers:
        workers |= _ping_workers(settings)
    report["workers"] = sorted(workers)
    return report


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


def _workers_from_jobs(session: Any, since: timedelta = timedelta(hours=1)) -> set[str]:
    """Inference workers that answered a job recently (works with every broker)."""
    recent = session.scalars(
        select(Job.result).where(Job.result.is_not(None), Job.updated_at >= utcnow() - since)
    )
    names = set()
    for result in recent:
        worker = ((result or {}).get("batch") or {}).get("worker")
        if worker:
            names.add(str(worker))
    return names


def _ping_workers(settings: Settings) -> set[str]:
    """Workers answering a broadcast ping (Redis only: the embedded broker has no broadcast)."""
    if not settings.effective_broker_url.startswith(("redis://", "rediss://")):
        return set()
    try:
        from cxrnode.jobs.broker import celery_app

        replies = celery_app(settings).control.inspect(timeout=1.0).ping() or {}
        return set(replies)
    except Exception:
        return set()


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
    if "workers" in report:
        lines.append(f"{'workers':<10} {', '.join(report['workers']) or 'none seen'}")
    return "\n".join(lines)

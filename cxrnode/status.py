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
from cxrnode.settings import Settings


def _counts(session: Any, column: Any, states: type) -> dict[str, int]:
    counts = {state.value: 0 for state in states}
    for state, count in session.execute(select(column, func.count()).group_by(column)):
        counts[str(state.value if hasattr(state, "value") else state)] = count
    return counts


def collect_status(settings: Settings) -> dict[str, Any]:
    """Counts of instances, studies, jobs and outputs by state, from the database."""
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            report: dict[str, Any] = {
                "instances": _counts(session, Instance.state, InstanceState),
                "studies": _counts(session, Study.state, StudyState),
                "jobs": _counts(session, Job.state, JobState),
                "outputs": _counts(session, Output.state, OutputState),
            }
    finally:
        engine.dispose()
    return report


def render_status(report: dict[str, Any]) -> str:
    lines = []
    for section in ("instances", "studies", "jobs", "outputs", "queues"):
        if section not in report:
            continue
        values = report[section]
        parts = ", ".join(f"{k} {v}" for k, v in values.items())
        lines.append(f"{section:<10} {parts or '-'}")
    if "workers" in report:
        lines.append(f"{'workers':<10} {', '.join(report['workers']) or 'none seen'}")
    return "\n".join(lines)

"""Job state transitions: the database side of the pipeline.

The broker only carries work; these functions decide what a task may do, record what it did,
and find work the broker lost. Each transition checks the job's current state and version so
that a redelivered task, a reconciler re-enqueue and the original run all converge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.db import FINAL_JOB_STATES, Instance, Job, JobState, utcnow

#: the stage a job in a given state needs next when its message went missing
NEXT_STAGE = {
    JobState.pending: "prepare",
    JobState.queued: "prepare",
    JobState.prepared: "prepare",  # the infer message carries the image: rebuild it
    JobState.waiting_model: "prepare",
    JobState.inferred: "finish",
}


@dataclass(frozen=True)
class PrepareWork:
    job_id: int
    version: int
    instance_path: str  # relative to DATA_DIR/instances


def set_state(session: Session, job_id: int, state: JobState, error: str | None = None) -> bool:
    """Move a job that is still open to ``state``; False when it is already final."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.state in FINAL_JOB_STATES:
        return False
    job.state = state
    job.error = error
    job.updated_at = utcnow()
    session.commit()
    return True


def take_pending(session: Session, limit: int = 100) -> list[int]:
    """Jobs to hand to the queue now (new ones); they move to ``queued``."""
    jobs = session.scalars(
        select(Job)
        .where(Job.state == JobState.pending)
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    now = utcnow()
    for job in jobs:
        job.state = JobState.queued
        job.updated_at = now
    session.commit()
    return [job.id for job in jobs]


def start_prepare(session: Session, job_id: int) -> PrepareWork | None:
    """What a prepare task needs, or None when the job no longer wants it."""
    job = session.get(Job, job_id)
    if job is None or job.state in FINAL_JOB_STATES or job.state == JobState.inferred:
        return None
    instance = session.get(Instance, job.instance_id)
    if instance is None:
        return None
    return PrepareWork(job.id, job.version, instance.path)


def record_result(
    session: Session, job_id: int, result: dict[str, Any], batch: dict[str, Any] | None = None
) -> bool:
    """Store the model's answer on the job (once); False when it was already stored or the
    job was superseded, so a duplicate delivery changes nothing."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.state in FINAL_JOB_STATES or job.state == JobState.inferred:
        return False
    job.report = result.get("report")
    job.differential = result.get("differential")
    job.recommendation = result.get("recommendation")
    job.findings = result.get("findings")
    job.timings = result.get("timings")
    job.model_id = result.get("model_id")
    job.model_hash = result.get("model_hash")
    job.result = {**result, "batch": batch} if batch else result
    if batch:
        job.batch_id = batch.get("id")
        job.batch_size = batch.get("size")
    job.state = JobState.inferred
    job.error = None
    job.updated_at = utcnow()
    session.commit()
    return True


def finish(session: Session, job_id: int) -> bool:
    """Mark an inferred job done once its outputs are recorded."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.state != JobState.inferred:
        return False
    job.state = JobState.done
    job.updated_at = utcnow()
    session.commit()
    return True


def stale_jobs(
    session: Session, deadline_seconds: float, now: datetime | None = None
) -> list[tuple[int, str]]:
    """Open jobs untouched for longer than the deadline, with the stage each needs again.

    Their ``updated_at`` is refreshed so the next pass waits another deadline before trying
    again.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=deadline_seconds)
    jobs = session.scalars(
        select(Job)
        .where(Job.state.in_(list(NEXT_STAGE)), Job.updated_at < cutoff)
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    ).all()
    work = []
    for job in jobs:
        job.attempts += 1
        job.updated_at = now
        if job.state == JobState.pending:
            job.state = JobState.queued
        work.append((job.id, NEXT_STAGE[job.state]))
    session.commit()
    return work

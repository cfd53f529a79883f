"""The job state machine: one table of allowed moves, and every write a compare-and-set.

::

    pending ──► queued ──► prepared ──► inferred ──► done
                  │           │  ▲          │
                  │           ▼  │          │
                  │      waiting_model      │
                  ▼           ▼             ▼
                failed      failed        failed        (any open state ──► superseded)

- ``pending``: study grouping made the job; the scheduler has not handed it to the broker.
- ``queued``: ``prepare_image`` was published.
- ``prepared``: the display image and the model input are kept in DATA_DIR; ``infer_report``
  was published (after the commit: commit first, then enqueue, everywhere).
- ``waiting_model``: the inference side has no usable model; its task retries.
- ``inferred``: the model's result is recorded; the outputs are being built.
- ``done``: the outputs are written and recorded in the outbox, in the same transaction.
- ``failed`` (with the reason) and ``superseded`` (a newer version of the study's job) end it.

Every change goes through :func:`transition`, which locks the row, checks that the move is in
:data:`ALLOWED` (and that the message is for this job's version), writes the new state and a
:class:`~cxrnode.db.JobEvent`, and refuses anything else with one log line: a redelivered
task, a reconciler re-send that races the original, or a late answer for a superseded job
changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.db import (
    FINAL_JOB_STATES,
    Instance,
    Job,
    JobEvent,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from cxrnode.jobs.messages import BuildOutputs, InferReport, JobMessage, PrepareImage
from model.contracts import ModelResult

log = logging.getLogger(__name__)

S = JobState
_OPEN = (S.pending, S.queued, S.prepared, S.waiting_model, S.inferred)

#: Every allowed move (from, to). Nothing else is ever written.
ALLOWED: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (S.pending, S.queued),  # the scheduler published prepare_image
        (S.queued, S.prepared),  # images kept, infer_report published
        (S.prepared, S.prepared),  # prepared again (its kept model input was missing)
        (S.waiting_model, S.prepared),  # likewise, while waiting for a model
        (S.queued, S.failed),  # the image cannot be read
        (S.prepared, S.waiting_model),  # no usable model on the inference side
        (S.prepared, S.inferred),  # the model answered
        (S.waiting_model, S.inferred),  # ... once a model was there
        (S.prepared, S.failed),  # inference failed for good
        (S.waiting_model, S.failed),
        (S.inferred, S.done),  # outputs recorded
        (S.inferred, S.failed),  # outputs cannot be built
        *((state, S.superseded) for state in _OPEN),  # a newer version replaced it
    }
)

#: The message that moves a job on from each open state, when its message was lost.
RESEND: dict[JobState, type[JobMessage]] = {
    S.pending: PrepareImage,
    S.queued: PrepareImage,
    S.prepared: InferReport,
    S.waiting_model: InferReport,
    S.inferred: BuildOutputs,
}

#: A job whose messages were lost this many times fails instead of looping.
MAX_ATTEMPTS = 5


class Refused(Exception):
    """A transition that :data:`ALLOWED` or the job's version does not permit."""


def allowed_from(to: JobState) -> frozenset[JobState]:
    """The states from which ``to`` may be entered."""
    return frozenset(src for src, dst in ALLOWED if dst == to)


def transition(
    session: Session,
    job_id: int,
    to: JobState,
    *,
    version: int | None = None,
    error: str | None = None,
    result: ModelResult | None = None,
    detail: str | None = None,
    commit: bool = True,
) -> bool:
    """Move job ``job_id`` to ``to`` if :data:`ALLOWED` permits it from its current state.

    ``version`` (the job version a message was made for) must match when given. ``error``
    replaces the job's error text (cleared when None). ``result`` is stored with ``inferred``.
    The change and its :class:`JobEvent` are written in one transaction, committed unless
    ``commit`` is False (the caller then commits more work with it).

    Returns False, logging one line, when the move is refused: the job is gone, its version
    differs, or the move is not allowed from its state (a duplicate or late message).
    """
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        log.warning("job %d: %s refused: no such job", job_id, to.value)
        session.rollback()
        return False
    current = JobState(job.state)
    if version is not None and job.version != version:
        log.info(
            "job %d: %s -> %s refused: message for version %d, job is version %d",
            job_id, current.value, to.value, version, job.version,
        )  # fmt: skip
        session.rollback()
        return False
    if (current, to) not in ALLOWED:
        level = logging.INFO if current in FINAL_JOB_STATES or current == to else logging.WARNING
        log.log(
            level, "job %d: %s -> %s refused (not an allowed move)", job_id, current.value, to.value
        )
        session.rollback()
        return False
    now = utcnow()
    job.state = to
    job.error = error
    job.updated_at = now
    if result is not None:
        job.result = result.to_dict()
    session.add(
        JobEvent(
            job_id=job_id,
            at=now,
            from_state=current.value,
            to_state=to.value,
            detail=detail or error,
        )
    )
    if commit:
        session.commit()
    return True


# --------------------------------------------------------------------------------- studies

T = StudyState

#: Every allowed move of a study (from, to). ``receiving`` is entered by ingest (any state:
#: a new image re-arms the quiet period); grouping settles or skips a study whose quiet
#: period is over; an admin's re-run settles a finished study again.
STUDY_ALLOWED: frozenset[tuple[StudyState, StudyState]] = frozenset(
    {
        (T.receiving, T.settled),  # its quiet period is over: a job was made (or kept)
        (T.receiving, T.skipped),  # nothing the model can read
        (T.settled, T.settled),  # re-run
        (T.skipped, T.settled),  # re-run after a readable image was recorded
        *((state, T.receiving) for state in StudyState),  # an arrival (ingest)
    }
)


def move_study(
    study: Study,
    to: StudyState,
    *,
    expect: Collection[StudyState] | None = None,
    skip_reason: str | None = None,
) -> bool:
    """Move ``study`` (read locked by the caller) to ``to`` if :data:`STUDY_ALLOWED`
    permits it and it is still in one of the ``expect`` states; set its skip reason (cleared
    unless given). Returns False, logging one line, when refused; nothing is committed."""
    current = StudyState(study.state)
    if (expect is not None and current not in expect) or (current, to) not in STUDY_ALLOWED:
        log.warning(
            "study %d: %s -> %s refused (%s)",
            study.id, current.value, to.value,
            "stale: it changed meanwhile" if expect and current not in expect else "not allowed",
        )  # fmt: skip
        return False
    study.state = to
    study.skip_reason = skip_reason
    return True


def new_version(
    session: Session,
    study: Any,
    instance_id: int,
    now: datetime,
    detail: str | None = None,
    *,
    node_host: str | None = None,
) -> Job:
    """Start job version ``study.version + 1`` for ``study`` on ``instance_id``, state
    ``pending``, with its first history row (flushed, not committed). ``node_host`` is the
    host holding the instance's file: the job's file-bound steps run on its queues."""
    study.version += 1
    study.chosen_instance_id = instance_id
    job = Job(
        study_id=study.id,
        instance_id=instance_id,
        node_host=node_host,
        version=study.version,
        state=JobState.pending,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    session.add(
        JobEvent(
            job_id=job.id,
            at=now,
            from_state=None,
            to_state=JobState.pending.value,
            detail=detail,
        )
    )
    return job


def require(ok: bool, what: str) -> None:
    """Raise :class:`Refused` when ``ok`` is False (for callers that must not go on)."""
    if not ok:
        raise Refused(what)


# ------------------------------------------------------------------------------ queries


@dataclass(frozen=True)
class Work:
    """A job as a task message names it."""

    job_id: int
    version: int
    node_host: str | None = None  # whose queues take its file-bound steps (None: plain ones)


@dataclass(frozen=True)
class PrepareWork:
    """What prepare_image needs: where the source is and what ingest recorded about it."""

    job_id: int
    version: int
    instance_path: str  # relative to DATA_DIR/instances
    study_instance_uid: str
    sop_instance_uid: str
    header: dict[str, Any] | None


def take_pending(session: Session, limit: int = 100) -> list[Work]:
    """Move new jobs to ``queued`` (committed); the caller then publishes prepare_image."""
    jobs = session.scalars(
        select(Job)
        .where(Job.state == S.pending)
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    taken = [Work(job.id, job.version, job.node_host) for job in jobs]
    for work in taken:
        transition(session, work.job_id, S.queued, commit=False)
    session.commit()
    return taken


def prepare_work(session: Session, job_id: int, version: int | None = None) -> PrepareWork | None:
    """What a prepare task needs, or None when the job no longer wants it."""
    job = session.get(Job, job_id)
    if job is None or job.state not in (S.queued, S.prepared, S.waiting_model):
        return None
    if version is not None and job.version != version:
        return None
    instance = session.get(Instance, job.instance_id)
    if instance is None:
        return None
    return PrepareWork(
        job.id,
        job.version,
        instance.path,
        instance.study_instance_uid,
        instance.sop_instance_uid,
        instance.header,
    )


@dataclass(frozen=True)
class Resend:
    """A job whose message is lost, and the message to publish again."""

    job_id: int
    version: int
    task: type[JobMessage]
    node_host: str | None = None  # the job's host (see :class:`Work`)


def find_lost(
    session: Session,
    *,
    waiting: dict[int, tuple[str, float]],
    held: set[int],
    grace_seconds: float,
    deadline_seconds: float,
    now: datetime | None = None,
) -> tuple[list[Resend], list[int]]:
    """Open jobs whose message is neither waiting in a queue nor held by a live worker.

    A job counts only once it has been in its state for ``grace_seconds`` (a message being
    published, or received but not yet reported). A job held or waiting for longer than
    ``deadline_seconds`` is treated as lost too (a hung worker, a stale mark). Each found job
    gets its attempt counted and its ``updated_at`` refreshed (one more grace period before it
    can be found again); one lost :data:`MAX_ATTEMPTS` times fails instead.

    Returns (what to re-send, ids of jobs that failed now); committed.
    """
    now = now or utcnow()
    recent = now - timedelta(seconds=grace_seconds)
    jobs = session.scalars(
        select(Job)
        .where(Job.state.in_(list(RESEND)), Job.updated_at < recent)
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    ).all()
    overdue = now - timedelta(seconds=deadline_seconds)
    resend: list[Resend] = []
    failed: list[int] = []
    for job in jobs:
        tracked = job.id in held or job.id in waiting
        if tracked and job.updated_at >= overdue:
            continue  # waiting in a queue or worked on by a live worker: slow, not lost
        state = JobState(job.state)
        job.attempts += 1
        job.updated_at = now
        if job.attempts > MAX_ATTEMPTS:
            transition(
                session,
                job.id,
                S.failed,
                error=f"its work was lost {MAX_ATTEMPTS} times (workers dying on it?)",
                commit=False,
            )
            failed.append(job.id)
            continue
        if state == S.pending:
            transition(session, job.id, S.queued, detail="re-sent", commit=False)
        resend.append(Resend(job.id, job.version, RESEND[state], job.node_host))
    session.commit()
    return resend, failed


def open_jobs(session: Session, ids: Iterable[int]) -> list[int]:
    """Which of ``ids`` are still open (not done, failed or superseded)."""
    ids = list(ids)
    if not ids:
        return []
    return list(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.state.in_(list(_OPEN)))))

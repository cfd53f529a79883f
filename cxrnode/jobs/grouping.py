"""Study grouping: decide when a study is complete and which image the model reads.

DICOM has no end-of-study signal, so a study "settles" after a quiet period
(SETTLE_SECONDS) that every readable arrival re-arms. A settled study gets one job for its
best frontal image: PA over AP over an unlabelled frontal chest image. Studies with nothing
readable are recorded as skipped with a reason. When a better image arrives after a job was
made, the next settle makes a new job version (the outputs then replace the earlier draft).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import (
    FINAL_JOB_STATES,
    Instance,
    InstanceState,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from cxrnode.jobs.states import move_study, new_version, transition

RECEIVING = (StudyState.receiving,)

VIEW_RANK = {"PA": 0, "AP": 1}
UNLABELLED_RANK = 2


def choose_frontal(candidates: Sequence[Instance]) -> Instance | None:
    """Best image for the model among readable instances: PA, then AP, then unlabelled;
    among equals, the most recently received (a repeat film is usually the better one)."""
    # a purged instance's file is gone (retention): it cannot be read again
    readable = [i for i in candidates if i.state == InstanceState.stored and i.purged_at is None]
    if not readable:
        return None
    return min(
        readable,
        key=lambda i: (
            VIEW_RANK.get(i.view or "", UNLABELLED_RANK),
            -i.received_at.timestamp(),
            -i.id,
        ),
    )


def skip_reason_for(instances: Sequence[Instance]) -> str:
    """Why a study with no readable image is skipped, in words an admin understands."""
    reasons = {i.skip_reason for i in instances if i.skip_reason}
    if reasons == {"lateral view"}:
        return "only lateral views"
    if not reasons:
        return "no instances"
    return "; ".join(sorted(reasons))


def settle_due_studies(
    session: Session, now: datetime | None = None, *, commit: bool = True
) -> list[int]:
    """Settle every study whose quiet period is over; return the ids of new jobs.

    Runs in one transaction (committed unless ``commit`` is False: the scheduler queues the
    new jobs in the same one); rows are locked so two schedulers never settle a study twice.
    """
    now = now or utcnow()
    query = (
        select(Study)
        .where(Study.state == StudyState.receiving, Study.settle_at <= now)
        .order_by(Study.settle_at)
        .with_for_update(skip_locked=True)
    )
    new_jobs: list[Job] = []
    for study in session.scalars(query).all():
        instances = session.scalars(select(Instance).where(Instance.study_id == study.id)).all()
        chosen = choose_frontal(instances)
        if chosen is None:
            move_study(
                study, StudyState.skipped, expect=RECEIVING, skip_reason=skip_reason_for(instances)
            )
            continue
        if not move_study(study, StudyState.settled, expect=RECEIVING):
            continue
        latest = session.scalar(
            select(Job)
            .where(Job.study_id == study.id, Job.state != JobState.superseded)
            .order_by(Job.id.desc())
        )
        if (
            latest is not None
            and latest.instance_id == chosen.id
            and latest.state != JobState.failed
        ):
            continue  # nothing better arrived (e.g. a duplicate or a lateral): keep the job
        if latest is not None and latest.state not in FINAL_JOB_STATES:
            transition(
                session,
                latest.id,
                JobState.superseded,
                detail="a better image arrived",
                commit=False,
            )
        new_jobs.append(new_version(session, study, chosen.id, now, node_host=chosen.node_host))
    if commit:
        session.commit()
    else:
        session.flush()
    return [job.id for job in new_jobs]


def next_settle_at(session: Session) -> datetime | None:
    """When the next receiving study's quiet period ends (None: no study is receiving)."""
    return session.scalar(
        select(func.min(Study.settle_at)).where(Study.state == StudyState.receiving)
    )

"""Re-running a study on an admin's request: a new job version, superseding the open ones.

A re-run is what study grouping does when a better image arrives, asked for by a person: the
study's best frontal image gets job version ``n + 1``; open jobs of older versions become
``superseded`` (their late messages are then refused by :mod:`cxrnode.jobs.states`), and the
new draft's outputs supersede older pending ones when they are built. Finished jobs keep
their state and history.

:func:`rerun_study` writes the new job, already ``queued``, in one transaction; the caller
then publishes ``prepare_image`` (commit first, then enqueue). If the caller dies in between,
the reconciler finds the job queued with no message and sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.db import (
    FINAL_JOB_STATES,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from cxrnode.jobs.grouping import choose_frontal
from cxrnode.jobs.states import Work, move_study, new_version, require, transition

#: The detail recorded on the new job's first event (and on the jobs it supersedes).
RERUN_DETAIL = "re-run requested by an admin"


class RerunRefused(Exception):
    """The study cannot be re-run now; the message says why and what to do."""


@dataclass(frozen=True)
class Rerun:
    """The new job, and the open jobs it superseded."""

    work: Work
    superseded: list[int] = field(default_factory=list)


def rerun_study(session: Session, study_uid: str) -> Rerun:
    """Make job version ``n + 1`` of the study (state ``queued``) and supersede its open jobs.

    Raises
    ------
    LookupError
        No study with this Study Instance UID was received.
    RerunRefused
        The study is still receiving images, or none of its images can be read by the model.
    """
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
    )
    if study is None:
        session.rollback()
        raise LookupError(f"no study {study_uid} was received")
    if study.state == StudyState.receiving:
        session.rollback()
        raise RerunRefused(
            f"study {study_uid} is still receiving images; it is processed when it settles"
        )
    instances = session.scalars(select(Instance).where(Instance.study_id == study.id)).all()
    chosen = choose_frontal(instances)
    if chosen is None:
        session.rollback()
        raise RerunRefused(
            f"study {study_uid} has no image the model can read ({study.skip_reason or 'none'}); "
            "send a frontal chest radiograph"
        )
    now = utcnow()
    superseded = []
    open_jobs = session.scalars(
        select(Job)
        .where(Job.study_id == study.id, Job.state.not_in(FINAL_JOB_STATES))
        .with_for_update()  # locked: no worker moves them on while they are superseded
    ).all()
    for job in open_jobs:
        require(
            transition(session, job.id, JobState.superseded, detail=RERUN_DETAIL, commit=False),
            f"job {job.id} could not be superseded",
        )
        superseded.append(job.id)
    require(move_study(study, StudyState.settled), f"study {study_uid} could not be settled again")
    job = new_version(
        session, study, chosen.id, now, detail=RERUN_DETAIL, node_host=chosen.node_host
    )
    transition(session, job.id, JobState.queued, detail=RERUN_DETAIL, commit=False)
    session.commit()
    return Rerun(Work(job.id, job.version, job.node_host), superseded)

"""Studies as the admin sees them: the list (filtered, paged) and one study in full.

Each study's state for an admin is its newest job's state (``done``, ``failed``, ...) once it
has one, else the study's own (``receiving``, ``skipped``). Stage timings come from the job's
history (``job_events``) and the outputs' delivery history (``output_attempts``):

========  =====================================================================
stage     from → to
========  =====================================================================
settle    the chosen image arrived → its job was made (the quiet period)
prepare   job made → image prepared (queue wait and decoding)
infer     prepared → the model's answer recorded (queue, waiting for a model)
deliver   answer recorded → SR/SC built and in the outbox (state ``done``)
send      done → every output of the job delivered at its destination
total     the chosen image arrived → every output delivered
========  =====================================================================

A re-run job has no settle or total (its image arrived long before the admin asked).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from cxrnode.db import (
    Instance,
    Job,
    JobEvent,
    JobState,
    Output,
    OutputAttempt,
    OutputState,
    Study,
    StudyState,
)
from cxrnode.jobs.rerun import RERUN_DETAIL

STAGES = ("settle", "prepare", "infer", "deliver", "send", "total")
DELIVERED = (OutputState.delivered.value, OutputState.delivered_warning.value)
#: Every value the ``state`` filter accepts.
STATE_FILTERS = tuple(
    [StudyState.receiving.value, StudyState.skipped.value] + [state.value for state in JobState]
)


# ----------------------------------------------------------------------------- timings


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


def stage_seconds(
    events: Sequence[Any],
    received_at: datetime | None,
    delivered_at: datetime | None,
) -> dict[str, float | None]:
    """Seconds spent in each stage of :data:`STAGES` (None: not reached, or not timed).

    ``events`` are one job's ``JobEvent`` rows (or anything with ``at``, ``to_state`` and
    ``detail``) in the order they happened; ``delivered_at`` is when the job's last output
    was delivered (None while any is not).
    """
    created = prepared_first = prepared_last = inferred = done = None
    rerun = False
    for event in events:
        state = event.to_state
        if state == JobState.pending.value and created is None:
            created, rerun = event.at, event.detail == RERUN_DETAIL
        elif state == JobState.prepared.value and inferred is None:
            prepared_first = prepared_first or event.at
            prepared_last = event.at
        elif state == JobState.inferred.value and inferred is None:
            inferred = event.at
        elif state == JobState.done.value and done is None:
            done = event.at
    arrived = None if rerun else received_at
    return {
        "settle": _seconds(arrived, created),
        "prepare": _seconds(created, prepared_first),
        "infer": _seconds(prepared_last, inferred),
        "deliver": _seconds(inferred, done),
        "send": _seconds(done, delivered_at),
        "total": _seconds(arrived, delivered_at),
    }


def delivered_at(outputs: Iterable[Any], first_delivery: dict[int, datetime]) -> datetime | None:
    """When the last of a job's outputs reached its destination (None while any has not;
    superseded outputs do not count)."""
    moments = []
    for output in outputs:
        if output.state == OutputState.superseded:
            continue
        moment = first_delivery.get(output.id)
        if moment is None:
            return None
        moments.append(moment)
    return max(moments) if moments else None


def first_deliveries(session: Session, output_ids: Iterable[int]) -> dict[int, datetime]:
    """Output id → the first moment it was delivered (from the delivery history)."""
    ids = list(output_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(OutputAttempt.output_id, func.min(OutputAttempt.at))
        .where(OutputAttempt.output_id.in_(ids), OutputAttempt.state.in_(DELIVERED))
        .group_by(OutputAttempt.output_id)
    )
    return {output_id: at for output_id, at in rows}


# ----------------------------------------------------------------------------- the list


class StudyRow(BaseModel):
    """One study in the list."""

    study_instance_uid: str
    state: str = Field(description="The newest job's state, else the study's.")
    version: int = Field(description="Job versions made (0: none yet).")
    error: str | None = Field(None, description="Why it failed or was skipped.")
    first_arrival: datetime
    last_arrival: datetime
    instance_count: int
    outputs: dict[str, int] = Field(description="The newest job's outputs by state.")
    stages: dict[str, float | None] = Field(description="Seconds per stage of the newest job.")


class StudyPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[StudyRow]


def _day_bound(value: date | datetime | None, end: bool) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    moment = datetime.combine(value, time.min)
    return moment + timedelta(days=1) if end else moment


def list_studies(
    session: Session,
    *,
    state: str | None = None,
    received_from: date | datetime | None = None,
    received_to: date | datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> StudyPage:
    """Studies by last arrival, newest first. ``received_to`` as a date includes that day."""
    latest = aliased(Job)
    query = select(Study, latest).outerjoin(
        latest, and_(latest.study_id == Study.id, latest.version == Study.version)
    )
    if state in (StudyState.receiving.value, StudyState.skipped.value, StudyState.settled.value):
        query = query.where(Study.state == state)
    elif state is not None:
        query = query.where(latest.state == state)
    start, end = _day_bound(received_from, False), _day_bound(received_to, True)
    if start is not None:
        query = query.where(Study.last_arrival >= start)
    if end is not None:
        query = query.where(Study.last_arrival < end)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.order_by(Study.last_arrival.desc(), Study.id.desc()).limit(limit).offset(offset)
    ).all()
    jobs = [job for _, job in rows if job is not None]
    job_ids = [job.id for job in jobs]
    events = _by_job(session, JobEvent, job_ids)
    outputs = _by_job(session, Output, job_ids)
    received = _received_at(session, [job.instance_id for job in jobs])
    delivered = first_deliveries(session, [o.id for rows_ in outputs.values() for o in rows_])
    items = []
    for study, job in rows:
        job_outputs = outputs.get(job.id, []) if job else []
        counts: dict[str, int] = {}
        for output in job_outputs:
            counts[str(output.state.value)] = counts.get(str(output.state.value), 0) + 1
        items.append(
            StudyRow(
                study_instance_uid=study.study_instance_uid,
                state=str(job.state.value) if job else str(study.state.value),
                version=study.version,
                error=(job.error if job else None) or study.skip_reason,
                first_arrival=study.first_arrival,
                last_arrival=study.last_arrival,
                instance_count=study.instance_count,
                outputs=counts,
                stages=stage_seconds(
                    events.get(job.id, []),
                    received.get(job.instance_id),
                    delivered_at(job_outputs, delivered),
                )
                if job
                else dict.fromkeys(STAGES),
            )
        )
    session.rollback()
    return StudyPage(total=total, limit=limit, offset=offset, items=items)


Row = TypeVar("Row", JobEvent, Output)


def _by_job(session: Session, model: type[Row], job_ids: list[int]) -> dict[int, list[Row]]:
    """Rows of ``model`` (a table with ``job_id``) for ``job_ids``, grouped by job, in id order."""
    found: dict[int, list[Row]] = {}
    if job_ids:
        query = select(model).where(model.job_id.in_(job_ids)).order_by(model.id)
        for row in session.scalars(query):
            found.setdefault(row.job_id, []).append(row)
    return found


def _received_at(session: Session, instance_ids: list[int]) -> dict[int, datetime]:
    if not instance_ids:
        return {}
    rows = session.execute(
        select(Instance.id, Instance.received_at).where(Instance.id.in_(instance_ids))
    )
    return dict(rows.tuples().all())


# ----------------------------------------------------------------------------- one study


class InstanceView(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    modality: str | None
    view: str | None
    state: str
    skip_reason: str | None
    size_bytes: int
    calling_aet: str
    received_at: datetime
    chosen: bool = Field(description="The image the newest job reads.")


class EventView(BaseModel):
    at: datetime
    from_state: str | None
    to_state: str
    detail: str | None


class ResultView(BaseModel):
    """The model's answer (an unverified AI draft)."""

    report: str
    differential: str
    recommendation: str
    findings: dict[str, str] = Field(description="present / absent / uncertain / not_mentioned")
    finding_sources: dict[str, str]
    model_id: str
    model_hash: str
    timings: dict[str, float] = Field(description="The model's seconds per phase of its batch.")
    batch_size: int | None
    worker: str | None
    samples: int = Field(1, description="Reports sampled and voted (self-consistency).")
    votes: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Per finding, how many samples had each state."
    )


class JobView(BaseModel):
    id: int
    version: int
    state: str
    attempts: int = Field(description="Times its work was lost and sent again.")
    error: str | None
    created_at: datetime
    updated_at: datetime
    sop_instance_uid: str = Field(description="The image it reads.")
    events: list[EventView]
    stages: dict[str, float | None]
    result: ResultView | None
    priority: str | None = Field(None, description="Triage: stat / asap / routine.")


class AttemptView(BaseModel):
    attempt: int = Field(description="Try number; 0 marks a resend (tries start again).")
    at: datetime
    state: str
    status: str | None
    error: str | None


class OutputView(BaseModel):
    id: int
    job_id: int
    version: int
    kind: str
    destination: str
    state: str
    attempts: int
    last_status: str | None
    last_error: str | None
    sop_instance_uid: str
    created_at: datetime
    updated_at: datetime
    history: list[AttemptView]


class StudyDetail(BaseModel):
    study_instance_uid: str
    state: str
    study_state: str
    skip_reason: str | None
    first_arrival: datetime
    last_arrival: datetime
    instance_count: int
    version: int
    instances: list[InstanceView]
    jobs: list[JobView] = Field(description="Newest version first.")
    outputs: list[OutputView] = Field(description="Newest version first.")


def study_detail(session: Session, study_uid: str) -> StudyDetail | None:
    """Everything recorded about one study (None: never received)."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    instances = session.scalars(
        select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
    ).all()
    sop_by_id = {i.id: i.sop_instance_uid for i in instances}
    jobs = session.scalars(
        select(Job).where(Job.study_id == study.id).order_by(Job.version.desc(), Job.id.desc())
    ).all()
    job_ids = [job.id for job in jobs]
    events = _by_job(session, JobEvent, job_ids)
    outputs = _by_job(session, Output, job_ids)
    all_outputs = [o for rows in outputs.values() for o in rows]
    history: dict[int, list[AttemptView]] = {}
    if all_outputs:
        attempts = session.scalars(
            select(OutputAttempt)
            .where(OutputAttempt.output_id.in_([o.id for o in all_outputs]))
            .order_by(OutputAttempt.id)
        )
        for a in attempts:
            history.setdefault(a.output_id, []).append(
                AttemptView(
                    attempt=a.attempt, at=a.at, state=a.state, status=a.status, error=a.error
                )
            )
    delivered = first_deliveries(session, [o.id for o in all_outputs])
    received = {i.id: i.received_at for i in instances}
    version_of = {job.id: job.version for job in jobs}
    newest = jobs[0] if jobs else None
    detail = StudyDetail(
        study_instance_uid=study.study_instance_uid,
        state=str(newest.state.value) if newest else str(study.state.value),
        study_state=str(study.state.value),
        skip_reason=study.skip_reason,
        first_arrival=study.first_arrival,
        last_arrival=study.last_arrival,
        instance_count=study.instance_count,
        version=study.version,
        instances=[
            InstanceView(
                sop_instance_uid=i.sop_instance_uid,
                series_instance_uid=i.series_instance_uid,
                modality=i.modality,
                view=i.view,
                state=str(i.state.value),
                skip_reason=i.skip_reason,
                size_bytes=i.size_bytes,
                calling_aet=i.calling_aet,
                received_at=i.received_at,
                chosen=newest is not None and newest.instance_id == i.id,
            )
            for i in instances
        ],
        jobs=[
            JobView(
                id=job.id,
                version=job.version,
                state=str(job.state.value),
                attempts=job.attempts,
                error=job.error,
                created_at=job.created_at,
                updated_at=job.updated_at,
                sop_instance_uid=sop_by_id.get(job.instance_id, ""),
                events=[
                    EventView(
                        at=e.at, from_state=e.from_state, to_state=e.to_state, detail=e.detail
                    )
                    for e in events.get(job.id, [])
                ],
                stages=stage_seconds(
                    events.get(job.id, []),
                    received.get(job.instance_id),
                    delivered_at(outputs.get(job.id, []), delivered),
                ),
                result=_result_view(job),
                priority=job.priority,
            )
            for job in jobs
        ],
        outputs=sorted(
            (
                OutputView(
                    id=o.id,
                    job_id=o.job_id,
                    version=version_of[o.job_id],
                    kind=o.kind,
                    destination=o.destination,
                    state=str(o.state.value),
                    attempts=o.attempts,
                    last_status=o.last_status,
                    last_error=o.last_error,
                    sop_instance_uid=o.sop_instance_uid,
                    created_at=o.created_at,
                    updated_at=o.updated_at,
                    history=history.get(o.id, []),
                )
                for o in all_outputs
            ),
            key=lambda o: (-o.version, o.kind, o.destination),
        ),
    )
    session.rollback()
    return detail


def _result_view(job: Job) -> ResultView | None:
    result = job.model_result
    if result is None:
        return None
    return ResultView(
        report=result.report,
        differential=result.differential,
        recommendation=result.recommendation,
        findings=dict(result.findings),
        finding_sources=dict(result.finding_sources),
        model_id=result.model_id,
        model_hash=result.model_hash,
        timings=dict(result.timings),
        batch_size=result.batch_size,
        worker=result.worker,
        samples=result.samples,
        votes={name: dict(counts) for name, counts in result.votes.items()},
    )

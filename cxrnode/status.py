"""The node's summary: one typed answer shared by `cxrnode status`, the API and the dashboard.

Counts by state, the oldest open job, recent failures and dead letters come from the
database (a read-only session); queue depths and live workers from the broker's Redis
(worker heartbeats, :mod:`cxrnode.jobs.tracking`), so workers are seen in both deployment
modes; disk from the data directory. Every part answers even when another is down: a broker
that does not answer gives ``workers=None`` and queue depths of ``None``.
"""

from __future__ import annotations

import shutil
import statistics
import time
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import (
    FINAL_JOB_STATES,
    Instance,
    InstanceState,
    Job,
    JobEvent,
    JobState,
    Output,
    OutputState,
    Refusal,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.jobs.broker import QUEUES, is_embedded, redis_client
from cxrnode.jobs.tracking import WorkerInfo, live_workers
from cxrnode.outputs.probe import DestinationDown, destinations_down
from cxrnode.retention import retention_counts
from cxrnode.settings import Settings

OPEN_JOB_STATES = tuple(state for state in JobState if state not in FINAL_JOB_STATES)
#: The chart of the last hour: twelve buckets of five minutes.
BUCKET_MINUTES, BUCKETS = 5, 12


class WorkerStatus(BaseModel):
    """One live worker process, from its heartbeat."""

    name: str
    queues: list[str]
    host: str
    pid: int
    jobs: int = Field(description="Jobs it holds (received, not finished).")
    seen_seconds_ago: float = Field(description="Age of its last heartbeat.")
    model: str | None = Field(
        None,
        description=(
            "Inference workers: 'loaded', 'unavailable' (loading failed; see model_error) or "
            "None (still loading: a worker loads it as soon as it starts)."
        ),
    )
    model_id: str | None = None
    model_hash: str | None = None
    device: str | None = None
    model_error: str | None = None
    gpu: str | None = Field(
        default=None, description="The GPU of a `cxrnode worker --gpus` process (its index)."
    )

    @classmethod
    def from_heartbeat(cls, worker: WorkerInfo, now: float) -> WorkerStatus:
        state = worker.state
        return cls(
            name=worker.name,
            queues=list(worker.queues),
            host=worker.host,
            pid=worker.pid,
            jobs=len(worker.held),
            seen_seconds_ago=round(max(0.0, now - worker.seen_at), 1),
            **{
                key: None if state.get(key) is None else str(state[key])
                for key in ("model", "model_id", "model_hash", "device", "model_error", "gpu")
            },
        )


class DeadLetter(BaseModel):
    """An output that gave up: what `cxrnode resend --output ID` and the API need."""

    id: int
    study_instance_uid: str
    kind: str
    destination: str
    attempts: int
    last_status: str | None
    last_error: str | None
    at: datetime


class Failure(BaseModel):
    """A job that failed, with its reason."""

    job_id: int
    version: int
    study_instance_uid: str
    error: str | None
    at: datetime


class Disk(BaseModel):
    path: str
    free_bytes: int
    total_bytes: int
    reserve_bytes: int = Field(description="MIN_FREE_DISK_MB: below it C-STOREs are refused.")


class Bucket(BaseModel):
    """Five minutes of the last hour."""

    start: datetime
    done: int = Field(description="Jobs whose draft was made (state done).")
    failed: int
    median_seconds: float | None = Field(
        None, description="Median time from the image's arrival to its draft."
    )


class LastHour(BaseModel):
    done: int
    failed: int
    median_seconds: float | None
    p90_seconds: float | None
    buckets: list[Bucket]


class Retention(BaseModel):
    """What retention removed so far (the database keeps the records)."""

    days: float = Field(description="RETENTION_DAYS: files go this long after delivery; 0: off.")
    purged_studies: int
    purged_instances: int
    purged_outputs: int
    purged_instance_bytes: int
    last_purge: str | None = Field(None, description="When it last removed something (UTC).")


class Summary(BaseModel):
    """What the node is doing, at a glance."""

    generated_at: datetime
    mode: str = Field(description="'embedded' (broker started by serve) or 'distributed'.")
    instances: dict[str, int]
    studies: dict[str, int]
    jobs: dict[str, int]
    outputs: dict[str, int]
    open_jobs: int = Field(description="Jobs not yet done, failed or superseded.")
    oldest_open_job_seconds: float | None
    queues: dict[str, int | None] = Field(description="Messages waiting; None: broker down.")
    workers: list[WorkerStatus] | None = Field(description="None: the broker does not answer.")
    dead_letters: list[DeadLetter]
    failures: list[Failure]
    disk: Disk
    last_hour: LastHour
    retention: Retention
    refused_today: dict[str, int] = Field(
        description="C-STOREs refused in the last 24 hours, by kind (uid-conflict, unreadable, "
        "mismatch, not-supported, out-of-resources)."
    )
    destinations_down: list[DestinationDown] = Field(
        default_factory=list,
        description="Destinations with outputs waiting after a failed try: since when, the "
        "last error, the next probe (sent as soon as it answers) and the next scheduled try.",
    )


# ----------------------------------------------------------------------------- collecting


def collect_status(
    settings: Settings, *, session: Session | None = None, redis: Any = None
) -> Summary:
    """The summary. Without ``session``/``redis`` it opens (and closes) its own."""
    if session is None:
        engine = make_engine(settings.effective_database_url, read_only=True)
        try:
            with make_sessionmaker(engine)() as own:
                return collect_status(settings, session=own, redis=redis)
        finally:
            engine.dispose()
    now = utcnow()
    counts = {
        "instances": counts_by_state(session, Instance.state, InstanceState),
        "studies": counts_by_state(session, Study.state, StudyState),
        "jobs": counts_by_state(session, Job.state, JobState),
        "outputs": counts_by_state(session, Output.state, OutputState),
    }
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state.in_(OPEN_JOB_STATES)))
    queues, workers = broker_view(settings, redis)
    summary = Summary(
        generated_at=now,
        mode="embedded" if is_embedded(settings) else "distributed",
        **counts,
        open_jobs=sum(counts["jobs"][state.value] for state in OPEN_JOB_STATES),
        oldest_open_job_seconds=None if oldest is None else (now - oldest).total_seconds(),
        queues=queues,
        workers=workers,
        dead_letters=dead_letters(session),
        failures=failures(session),
        refused_today=refused_since(session, now - timedelta(hours=24)),
        disk=disk(settings),
        last_hour=last_hour(session, now),
        retention=Retention(days=settings.retention_days, **retention_counts(session)),
        destinations_down=down_view(settings, session, redis),
    )
    session.rollback()
    return summary


def down_view(settings: Settings, session: Session, redis: Any = None) -> list[DestinationDown]:
    """The destinations that are down; the prober's notes only when the broker answers."""
    client = redis
    try:
        if client is None:
            client = quick_redis(settings)
    except Exception:
        client = None
    try:
        return destinations_down(session, client)
    finally:
        if redis is None and client is not None:
            client.close()


def counts_by_state(session: Session, column: Any, states: type) -> dict[str, int]:
    counts = {state.value: 0 for state in states}
    for state, count in session.execute(select(column, func.count()).group_by(column)):
        counts[str(state.value if hasattr(state, "value") else state)] = count
    return counts


def quick_redis(settings: Settings) -> Any:
    """A client of the broker's Redis that gives up at once when it does not answer (redis-py
    retries ten times with backoff by default: seconds per call while the broker is down)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis_client(settings, timeout=2)
    client.set_retry(Retry(NoBackoff(), 1))
    return client


def broker_view(
    settings: Settings, redis: Any = None
) -> tuple[dict[str, int | None], list[WorkerStatus] | None]:
    """Queue depths and live workers (None for what the broker cannot tell)."""
    depths: dict[str, int | None] = dict.fromkeys(QUEUES)
    client = redis
    try:
        if client is None:
            client = quick_redis(settings)
        with client.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.llen(queue)
            for queue, depth in zip(QUEUES, pipe.execute(), strict=True):
                depths[queue] = int(depth)
        now = time.time()
        workers = [WorkerStatus.from_heartbeat(w, now) for w in live_workers(client)]
    except Exception:  # the summary must answer while the broker is down
        return depths, None
    finally:
        if redis is None and client is not None:
            client.close()
    return depths, workers


def dead_letters(session: Session, limit: int = 50) -> list[DeadLetter]:
    """The newest outputs that gave up."""
    rows = session.execute(
        select(Output, Study.study_instance_uid)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Output.state == OutputState.dead)
        .order_by(Output.updated_at.desc(), Output.id.desc())
        .limit(limit)
    )
    return [
        DeadLetter(
            id=row.id,
            study_instance_uid=uid,
            kind=row.kind,
            destination=row.destination,
            attempts=row.attempts,
            last_status=row.last_status,
            last_error=row.last_error,
            at=row.updated_at,
        )
        for row, uid in rows
    ]


def refused_since(session: Session, since: datetime) -> dict[str, int]:
    """C-STOREs refused since ``since``, by kind (the listener records each)."""
    rows = session.execute(
        select(Refusal.kind, func.count())
        .where(Refusal.received_at >= since)
        .group_by(Refusal.kind)
        .order_by(Refusal.kind)
    )
    return {kind: count for kind, count in rows}


def failures(session: Session, limit: int = 20) -> list[Failure]:
    """The newest failed jobs whose study has no newer job (a re-run clears it)."""
    rows = session.execute(
        select(Job, Study.study_instance_uid)
        .join(Study, Job.study_id == Study.id)
        .where(Job.state == JobState.failed, Job.version == Study.version)
        .order_by(Job.updated_at.desc(), Job.id.desc())
        .limit(limit)
    )
    return [
        Failure(
            job_id=job.id,
            version=job.version,
            study_instance_uid=uid,
            error=job.error,
            at=job.updated_at,
        )
        for job, uid in rows
    ]


def disk(settings: Settings) -> Disk:
    path = settings.data_dir
    try:
        usage = shutil.disk_usage(path)
        free, total = usage.free, usage.total
    except OSError:
        free = total = 0
    return Disk(
        path=str(path),
        free_bytes=free,
        total_bytes=total,
        reserve_bytes=settings.min_free_disk_mb * 1024 * 1024,
    )


def last_hour(session: Session, now: datetime) -> LastHour:
    """Drafts made and jobs failed in the last hour, in five-minute buckets, with the time
    from each image's arrival to its draft."""
    start = now - timedelta(minutes=BUCKET_MINUTES * BUCKETS)
    rows = session.execute(
        select(JobEvent.to_state, JobEvent.at, Instance.received_at)
        .join(Job, JobEvent.job_id == Job.id)
        .join(Instance, Job.instance_id == Instance.id)
        .where(
            JobEvent.to_state.in_([JobState.done.value, JobState.failed.value]),
            JobEvent.at >= start,
        )
    ).all()
    width = timedelta(minutes=BUCKET_MINUTES)
    done: list[list[float]] = [[] for _ in range(BUCKETS)]
    failed = [0] * BUCKETS
    for state, at, received in rows:
        index = min(BUCKETS - 1, int((at - start) / width))
        if state == JobState.done.value:
            done[index].append(max(0.0, (at - received).total_seconds()))
        else:
            failed[index] += 1
    every = sorted(seconds for bucket in done for seconds in bucket)
    return LastHour(
        done=len(every),
        failed=sum(failed),
        median_seconds=statistics.median(every) if every else None,
        p90_seconds=every[min(len(every) - 1, int(0.9 * len(every)))] if every else None,
        buckets=[
            Bucket(
                start=start + i * width,
                done=len(done[i]),
                failed=failed[i],
                median_seconds=statistics.median(done[i]) if done[i] else None,
            )
            for i in range(BUCKETS)
        ],
    )


# ----------------------------------------------------------------------------- rendering


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _nonzero(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if v) or "none"


def render_status(summary: Summary) -> str:
    """The summary for a terminal."""
    lines = [
        f"{'instances':<10} {_nonzero(summary.instances)}",
        f"{'studies':<10} {_nonzero(summary.studies)}",
        f"{'jobs':<10} {_nonzero(summary.jobs)}"
        + (f" (oldest open: {_age(summary.oldest_open_job_seconds)})" if summary.open_jobs else ""),
        f"{'outputs':<10} {_nonzero(summary.outputs)}",
        f"{'queues':<10} "
        + ", ".join(f"{q} {'?' if d is None else d}" for q, d in summary.queues.items()),
    ]
    hour = summary.last_hour
    lines.append(
        f"{'last hour':<10} {hour.done} drafts, {hour.failed} failed"
        + (f", median {_age(hour.median_seconds)} from arrival" if hour.median_seconds else "")
    )
    free, reserve = summary.disk.free_bytes, summary.disk.reserve_bytes
    lines.append(
        f"{'disk':<10} {_size(free)} free of {_size(summary.disk.total_bytes)} "
        f"(reserve {_size(reserve)}){'  BELOW THE RESERVE: C-STOREs refused' if free < reserve else ''}"
    )
    if summary.refused_today:
        lines.append(
            f"{'refused':<10} last 24 h: "
            + ", ".join(f"{kind} {count}" for kind, count in summary.refused_today.items())
        )
    kept = summary.retention
    lines.append(
        f"{'retention':<10} "
        + (f"files kept {kept.days:g} days after delivery" if kept.days else "off")
        + f"; purged so far: {kept.purged_studies} studies, {kept.purged_instances} instances"
        + f" ({_size(kept.purged_instance_bytes)}), {kept.purged_outputs} outputs"
        + (f", last {kept.last_purge}" if kept.last_purge else "")
    )
    for failure in summary.failures:
        lines.append(
            f"{'failed':<10} job {failure.job_id} (study {failure.study_instance_uid}): "
            f"{failure.error}"
        )
    for down in summary.destinations_down:
        lines.append(
            f"{'DOWN':<10} {down.destination} since {down.since:%Y-%m-%d %H:%M:%S} UTC, "
            f"{down.waiting} outputs waiting; last error: {down.last_error or down.last_status}; "
            + (
                f"next probe {down.next_probe_at:%H:%M:%S} UTC (sent as soon as it answers)"
                if down.next_probe_at
                else f"next try {down.next_send_at:%H:%M:%S} UTC"
                if down.next_send_at
                else "no try scheduled"
            )
        )
    for dead in summary.dead_letters:
        lines.append(
            f"{'dead':<10} output {dead.id} ({dead.kind}) to {dead.destination}: "
            f"{dead.last_error or dead.last_status} - `cxrnode resend --output {dead.id}`"
        )
    if summary.workers is None:
        lines.append(f"{'workers':<10} unknown (the broker does not answer)")
    elif not summary.workers:
        lines.append(f"{'workers':<10} none alive")
    for worker in summary.workers or []:
        model = ""
        if "infer" in worker.queues:
            model = f", model {worker.model or 'loading'}"
            if worker.model_id:
                model += f" ({worker.model_id} on {worker.device})"
            if worker.gpu is not None:
                model += f", GPU {worker.gpu}"
        lines.append(
            f"{'worker':<10} {worker.name}: {','.join(worker.queues)}, "
            f"{worker.jobs} jobs held{model}"
        )
    return "\n".join(lines)

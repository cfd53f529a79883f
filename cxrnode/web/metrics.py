"""Prometheus metrics of the node, correct across its many processes.

Three sources, each measured where it is true:

- **C-STORE handling** happens in the listener processes (one per core, sharing the port).
  They count (:mod:`cxrnode.net.metrics`) into prometheus-client's multiprocess files in ``DATA_DIR/metrics``
  (``PROMETHEUS_MULTIPROC_DIR``, emptied by ``cxrnode serve`` at each start, set before any
  child starts); the web app adds the files up at each scrape
  (``cxrnode_cstore_requests_total``, ``cxrnode_cstore_received_bytes_total``,
  ``cxrnode_cstore_handling_seconds``).
- **State** (studies, jobs and outputs by state, the oldest open job, queue depths, live
  workers, the model, disk) is read at scrape time from the database, the broker's Redis
  (worker heartbeats) and the file system, so it is right in both deployment modes, with
  workers on other hosts, and after any restart. Nothing is computed between scrapes.
- **Stage latencies** (``cxrnode_stage_seconds{stage}``: settle, prepare, infer, deliver,
  send, total; see :mod:`cxrnode.web.studies`) and the model's own phases
  (``cxrnode_model_seconds{phase}``, from ``ModelResult.timings``) are observed by the web
  app from the job history (``job_events``) and the delivery history (``output_attempts``)
  written since it started: at each scrape it reads the rows after its cursor. Rows younger
  than :data:`SETTLE_SECONDS` wait for the next scrape, so a transaction still committing
  on PostgreSQL (ids are not committed in order there) is not skipped.

Label values are states, queues, stages, DICOM statuses, worker names and model
identities: never patient names, IDs or dates (DESIGN.md, invariant 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cxrnode.net.metrics import (
    CSTORE_BYTES,
    CSTORE_REQUESTS,
    CSTORE_SECONDS,
    MULTIPROCESS_ENV,
    metrics_dir,
    multiprocess,
    observe_store,
    prepare_metrics_dir,
)
from cxrnode.retention import retention_metrics
from cxrnode.settings import Settings

#: Rows of the histories younger than this are left for the next scrape.
SETTLE_SECONDS = 3.0


# ------------------------------------------------------------------ scrape-time state


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class NodeCollector:
    """Gauges read at scrape time from the database, the broker and the disk."""

    def __init__(self, settings: Settings, readers: sessionmaker, redis: Any) -> None:
        self.settings = settings
        self.readers = readers
        self.redis = redis

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from cxrnode.status import OPEN_JOB_STATES, broker_view, counts_by_state, disk

        database_up = _gauge("cxrnode_database_up", "1 when the database answered this scrape.")
        try:
            with self.readers() as session:
                families = self._database(session, counts_by_state, OPEN_JOB_STATES)
                session.rollback()
            database_up.add_metric([], 1)
            yield from families
        except Exception:
            database_up.add_metric([], 0)
        yield database_up

        queues, workers = broker_view(self.settings, self.redis)
        broker_up = _gauge("cxrnode_broker_up", "1 when the broker's Redis answered this scrape.")
        broker_up.add_metric([], 0 if workers is None else 1)
        yield broker_up
        depth = _gauge("cxrnode_queue_depth", "Messages waiting in each queue.", ["queue"])
        for queue, value in queues.items():
            if value is not None:
                depth.add_metric([queue], value)
        yield depth
        if workers is not None:
            yield from self._workers(workers, list(queues))
        yield from self._destinations()

        space = disk(self.settings)
        for name, doc, value in (
            ("cxrnode_disk_free_bytes", "Free bytes on DATA_DIR's file system.", space.free_bytes),
            ("cxrnode_disk_total_bytes", "Size of DATA_DIR's file system.", space.total_bytes),
            (
                "cxrnode_disk_reserve_bytes",
                "MIN_FREE_DISK_MB in bytes: below it C-STOREs are refused with 0xA700.",
                space.reserve_bytes,
            ),
        ):
            family = _gauge(name, doc)
            family.add_metric([], value)
            yield family

    def _destinations(self) -> Iterator[GaugeMetricFamily]:
        """Each destination up (1) or down (0: outputs wait after a failed try), and how
        long it has been down (:mod:`cxrnode.outputs.probe`)."""
        from cxrnode.db import utcnow
        from cxrnode.outputs.probe import destinations_down

        try:
            with self.readers() as session:
                down = {d.destination: d for d in destinations_down(session, self.redis)}
                session.rollback()
        except Exception:
            return
        now = utcnow()
        up = _gauge(
            "cxrnode_destination_up",
            "1 when nothing waits for the destination after a failed try; 0 when it is down.",
            ["destination"],
        )
        since = _gauge(
            "cxrnode_destination_down_seconds",
            "Seconds since the destination was first seen failing (0 while up).",
            ["destination"],
        )
        waiting = _gauge(
            "cxrnode_destination_waiting_outputs",
            "Outputs waiting for the destination after a failed try.",
            ["destination"],
        )
        entries = dict.fromkeys([*self.settings.destinations, *self.settings.hl7_destinations])
        entries.update(dict.fromkeys(down))
        for entry in entries:
            item = down.get(entry)
            up.add_metric([entry], 0 if item else 1)
            since.add_metric([entry], (now - item.since).total_seconds() if item else 0)
            waiting.add_metric([entry], item.waiting if item else 0)
        yield from (up, since, waiting)

    def _database(self, session: Session, counts: Any, open_states: Any) -> list[Any]:
        from cxrnode.db import (
            Instance,
            InstanceState,
            Job,
            JobState,
            Output,
            OutputState,
            Study,
            StudyState,
            utcnow,
        )

        families = []
        for name, doc, column, states in (
            ("cxrnode_instances", "Instances recorded, by state.", Instance.state, InstanceState),
            ("cxrnode_studies", "Studies, by state.", Study.state, StudyState),
            ("cxrnode_jobs", "Jobs (all versions), by state.", Job.state, JobState),
            (
                "cxrnode_outputs",
                "Outputs (SR, SC per destination), by state; dead: dead letters.",
                Output.state,
                OutputState,
            ),
        ):
            family = _gauge(name, doc, ["state"])
            for state, value in counts(session, column, states).items():
                family.add_metric([state], value)
            families.append(family)
        oldest = session.scalar(
            select(func.min(Job.created_at)).where(Job.state.in_(list(open_states)))
        )
        age = _gauge(
            "cxrnode_oldest_open_job_age_seconds",
            "Age of the oldest job not yet done, failed or superseded (0: none open).",
        )
        age.add_metric([], 0.0 if oldest is None else (utcnow() - oldest).total_seconds())
        families.append(age)
        families.extend(_urgent_families(session))
        return families

    def _workers(self, workers: list[Any], queues: list[str]) -> Iterator[GaugeMetricFamily]:
        live = _gauge(
            "cxrnode_workers_live", "Worker processes with a live heartbeat, by queue.", ["queue"]
        )
        for queue in queues:
            live.add_metric([queue], sum(queue in w.queues for w in workers))
        yield live
        inference = [w for w in workers if "infer" in w.queues]
        states = _gauge(
            "cxrnode_inference_workers",
            "Inference workers by model state: loaded, unavailable (loading failed), "
            "not_loaded (loads with its first study).",
            ["model_state"],
        )
        for state in ("loaded", "unavailable", "not_loaded"):
            states.add_metric([state], sum((w.model or "not_loaded") == state for w in inference))
        yield states
        loaded = [w for w in inference if w.model == "loaded"]
        any_loaded = _gauge("cxrnode_model_loaded", "1 when some inference worker has a model.")
        any_loaded.add_metric([], 1 if loaded else 0)
        yield any_loaded
        info = _gauge(
            "cxrnode_model_info",
            "Inference workers with this model loaded (identity: checkpoint, hash, device).",
            ["model_id", "model_hash", "device"],
        )
        identities: dict[tuple[str, str, str], int] = {}
        for worker in loaded:
            key = (worker.model_id or "", worker.model_hash or "", worker.device or "")
            identities[key] = identities.get(key, 0) + 1
        for key, count in sorted(identities.items()):
            info.add_metric(list(key), count)
        yield info


# ------------------------------------------------------------------ stage latencies

STAGES = ("settle", "prepare", "infer", "deliver", "send", "total")
MODEL_PHASES = ("encode", "prefill", "decode", "total")
_STAGE_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)


class StageHistograms:
    """Stage latencies observed from the job and delivery histories (see module docstring)."""

    def __init__(self) -> None:
        self.stages = Histogram(
            "cxrnode_stage_seconds",
            "Seconds per stage of a job: settle, prepare, infer, deliver (draft built), "
            "send (delivered at every destination), total (arrival to delivered).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=None,
        )
        self.model = Histogram(
            "cxrnode_model_seconds",
            "The model's own seconds per phase of the batch a study ran in "
            "(encode, prefill, decode, total).",
            ["phase"],
            buckets=_STAGE_BUCKETS,
            registry=None,
        )
        for stage in STAGES:  # every series exists from the start
            self.stages.labels(stage)
        for phase in MODEL_PHASES:
            self.model.labels(phase)
        self.event_cursor = 0
        self.attempt_cursor = 0

    def collectors(self) -> list[Histogram]:
        return [self.stages, self.model]

    def start(self, session: Session) -> None:
        """Observe only what happens from now on (a restart is a counter reset)."""
        from cxrnode.db import JobEvent, OutputAttempt

        self.event_cursor = session.scalar(select(func.max(JobEvent.id))) or 0
        self.attempt_cursor = session.scalar(select(func.max(OutputAttempt.id))) or 0
        session.rollback()

    def update(self, session: Session, now: datetime) -> None:
        """Observe the stages that ended since the last call."""
        from cxrnode.db import Instance, Job, JobEvent, JobState, Output, OutputAttempt
        from cxrnode.web.studies import DELIVERED, stage_seconds

        ripe = now - timedelta(seconds=SETTLE_SECONDS)
        events = _ripe(
            session.scalars(
                select(JobEvent).where(JobEvent.id > self.event_cursor).order_by(JobEvent.id)
            ),
            ripe,
        )
        attempts = _ripe(
            session.scalars(
                select(OutputAttempt)
                .where(OutputAttempt.id > self.attempt_cursor)
                .order_by(OutputAttempt.id)
            ),
            ripe,
        )
        done_jobs = {e.job_id for e in events if e.to_state == JobState.done.value}
        inferred_jobs = {e.job_id for e in events if e.to_state == JobState.inferred.value}
        delivered_outputs = {a.output_id for a in attempts if a.state in DELIVERED}
        jobs_of_outputs = (
            dict(
                session.execute(
                    select(Output.id, Output.job_id).where(Output.id.in_(delivered_outputs))
                )
                .tuples()
                .all()
            )
            if delivered_outputs
            else {}
        )
        sent_jobs = set(jobs_of_outputs.values())
        wanted = done_jobs | inferred_jobs | sent_jobs
        if wanted:
            jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(wanted)))}
            history: dict[int, list[Any]] = {}
            for event in session.scalars(
                select(JobEvent).where(JobEvent.job_id.in_(wanted)).order_by(JobEvent.id)
            ):
                history.setdefault(event.job_id, []).append(event)
            received = dict(
                session.execute(
                    select(Instance.id, Instance.received_at).where(
                        Instance.id.in_([j.instance_id for j in jobs.values()])
                    )
                )
                .tuples()
                .all()
            )
            for job_id in inferred_jobs & jobs.keys():
                result = jobs[job_id].model_result
                for phase, seconds in (result.timings if result else {}).items():
                    self.model.labels(phase).observe(seconds)
            for job_id in done_jobs & jobs.keys():
                job = jobs[job_id]
                timed = stage_seconds(history.get(job_id, []), received.get(job.instance_id), None)
                for stage in ("settle", "prepare", "infer", "deliver"):
                    if timed[stage] is not None:
                        self.stages.labels(stage).observe(timed[stage])
            if attempts:
                self._observe_sent(session, sent_jobs & jobs.keys(), jobs, history, received)
        if events:
            self.event_cursor = events[-1].id
        if attempts:
            self.attempt_cursor = attempts[-1].id
        session.rollback()

    def _observe_sent(
        self,
        session: Session,
        job_ids: set[int],
        jobs: dict[int, Any],
        history: dict[int, list[Any]],
        received: dict[int, datetime],
    ) -> None:
        """Jobs whose last output was first delivered in the new rows: send and total."""
        from cxrnode.db import Output, OutputAttempt, OutputState
        from cxrnode.web.studies import DELIVERED, stage_seconds

        if not job_ids:
            return
        outputs = session.execute(
            select(Output.id, Output.job_id, Output.state).where(Output.job_id.in_(job_ids))
        ).all()
        first = dict(
            session.execute(
                select(OutputAttempt.output_id, func.min(OutputAttempt.id))
                .where(
                    OutputAttempt.output_id.in_([o.id for o in outputs]),
                    OutputAttempt.state.in_(DELIVERED),
                )
                .group_by(OutputAttempt.output_id)
            )
            .tuples()
            .all()
        )
        at_of = dict(
            session.execute(
                select(OutputAttempt.id, OutputAttempt.at).where(
                    OutputAttempt.id.in_(list(first.values()))
                )
            )
            .tuples()
            .all()
        )
        for job_id in job_ids:
            mine = [o for o in outputs if o.job_id == job_id and o.state != OutputState.superseded]
            if not mine or any(o.id not in first for o in mine):
                continue  # not every output has reached its destination yet
            last = max(first[o.id] for o in mine)
            if last <= self.attempt_cursor:
                continue  # the job was complete before these rows: observed already
            job = jobs[job_id]
            timed = stage_seconds(
                history.get(job_id, []), received.get(job.instance_id), at_of[last]
            )
            for stage in ("send", "total"):
                if timed[stage] is not None:
                    self.stages.labels(stage).observe(timed[stage])


def _ripe(rows: Any, ripe: datetime) -> list[Any]:
    """The rows in id order up to the first one younger than ``ripe``."""
    taken = []
    for row in rows:
        if row.at > ripe:
            break
        taken.append(row)
    return taken


def _urgent_families(session: Session) -> list[GaugeMetricFamily]:
    """Urgent drafts nobody acknowledged yet, and the oldest one's age (cxrnode.urgent)."""
    from cxrnode.urgent import unacknowledged_summary

    count, oldest = unacknowledged_summary(session)
    waiting = _gauge(
        "cxrnode_urgent_unacknowledged", "Urgent drafts (triage) nobody acknowledged yet."
    )
    waiting.add_metric([], count)
    age = _gauge(
        "cxrnode_urgent_oldest_unacknowledged_age_seconds",
        "Age of the oldest unacknowledged urgent draft (0: none).",
    )
    age.add_metric([], oldest)
    return [waiting, age]


class RetentionCollector:
    """What retention removed, read from the database at scrape time."""

    def __init__(self, readers: sessionmaker) -> None:
        self.readers = readers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.readers() as session:
                values = retention_metrics(session)
        except Exception:  # cxrnode_database_up already says the database is down
            return
        for name, value in values.items():
            family = _gauge(name, f"Retention: {name.removeprefix('cxrnode_retention_')}")
            family.add_metric([], value)
            yield family


def build_registry(
    collector: NodeCollector, stages: StageHistograms, *extra: Any
) -> CollectorRegistry:
    """The registry /metrics exposes: every process's instruments (multiprocess files), the
    stage histograms, the scrape-time gauges and ``extra`` collectors (agreement, retention)."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess():  # the stage histograms are in this process's file too
        MultiProcessCollector(registry)
    else:
        for histogram in stages.collectors():
            registry.register(histogram)
    for item in (collector, *extra):
        registry.register(item)
    return registry


__all__ = [
    "CSTORE_BYTES",
    "CSTORE_REQUESTS",
    "CSTORE_SECONDS",
    "MULTIPROCESS_ENV",
    "NodeCollector",
    "RetentionCollector",
    "StageHistograms",
    "build_registry",
    "metrics_dir",
    "observe_store",
    "prepare_metrics_dir",
]

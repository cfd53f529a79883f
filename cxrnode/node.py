"""`cxrnode serve`: the supervisor of one node.

It applies migrations, starts the DICOM listener processes (sharing the port), optionally the
Celery workers, and runs the scheduler loop (study grouping, job hand-off, reconciler) in the
main process. Children die with the supervisor (PR_SET_PDEATHSIG) and are restarted if they
exit unexpectedly.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from cxrnode.db import make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.storage import clean_tmp
from cxrnode.jobs import states as jobs
from cxrnode.jobs.broker import celery_app
from cxrnode.jobs.grouping import settle_due_studies
from cxrnode.net.listener import die_with_parent, run_listener
from cxrnode.outputs import outbox as sender
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

SCHEDULER_TICK = 0.1  # seconds; a study settles at most this late
#: embedded mode: one node-side worker and one inference worker
WORKER_QUEUES = ("prepare,deliver,send", "infer")


def prepare_data_dir(settings: Settings) -> None:
    for directory in (settings.instances_dir, settings.outputs_dir, settings.tmp_dir):
        directory.mkdir(parents=True, exist_ok=True)
    removed = clean_tmp(settings.tmp_dir)
    if removed:
        log.info("removed %d partial files left by an earlier crash", removed)


class WorkerProcess:
    """A `cxrnode worker` subprocess, with the same interface as multiprocessing's."""

    def __init__(self, queues: str) -> None:
        self.queues = queues
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("cxrnode")), "worker", "--queues", queues],
            preexec_fn=die_with_parent,
        )

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


class Scheduler:
    """The node's periodic work: settle studies, queue new jobs, re-queue lost ones."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.celery = celery_app(settings)
        self._last_reconcile = 0.0

    def send(self, stage: str, job_id: int) -> None:
        self.celery.send_task(f"cxrnode.{stage}", args=(job_id,))

    def tick(self) -> None:
        with self.sessions() as session:
            settle_due_studies(session)
        with self.sessions() as session:
            for job_id in jobs.take_pending(session):
                self.send("prepare", job_id)
        self.send_due_outputs()
        now = time.monotonic()
        if now - self._last_reconcile >= self.settings.reconcile_interval:
            self._last_reconcile = now
            self.reconcile()

    def send_due_outputs(self) -> None:
        """The outbox: hand outputs whose next try is due to the send queue, one task per
        study and destination. Claimed rows are leased, so the next tick skips them."""
        with self.sessions() as session:
            batches = sender.due_outputs(session, lease_seconds=sender.lease_seconds(self.settings))
        for batch in batches:
            self.celery.send_task("cxrnode.send", args=(batch.destination, batch.output_ids))

    def reconcile(self) -> None:
        """The database is the truth: re-send work whose messages the broker lost."""
        with self.sessions() as session:
            stale = jobs.stale_jobs(session, self.settings.job_deadline_seconds)
        for job_id, stage in stale:
            log.warning("job %d stuck past its deadline: re-enqueuing %s", job_id, stage)
            self.send(stage, job_id)


class Supervisor:
    """Owns the child processes and the scheduler loop of a node."""

    def __init__(self, settings: Settings, *, workers: bool = True) -> None:
        self.settings = settings
        self.workers = workers
        self.stop = threading.Event()
        self.context = multiprocessing.get_context("spawn")
        self.children: dict[str, multiprocessing.process.BaseProcess | WorkerProcess] = {}
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.scheduler = Scheduler(settings, self.sessions)

    def _start_listener(self, index: int, processes: int) -> None:
        name = f"listener-{index}"
        process = self.context.Process(
            target=run_listener, args=(self.settings, processes), name=name, daemon=True
        )
        process.start()
        self.children[name] = process

    def start(self) -> None:
        prepare_data_dir(self.settings)
        upgrade(self.engine)
        processes = self.settings.effective_scp_processes
        for index in range(processes):
            self._start_listener(index, processes)
        if self.workers:
            for queues in WORKER_QUEUES:
                self.children[f"worker-{queues}"] = WorkerProcess(queues)
        log.info(
            "cxrnode %s listening on %s:%d with %d processes",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.settings.dicom_port,
            processes,
        )

    def _watch_children(self) -> None:
        processes = self.settings.effective_scp_processes
        for name, process in list(self.children.items()):
            if process.is_alive():
                continue
            log.error("%s exited with %s; restarting it", name, process.exitcode)
            if name.startswith("listener-"):
                self._start_listener(int(name.split("-")[1]), processes)
            elif isinstance(process, WorkerProcess):
                self.children[name] = WorkerProcess(process.queues)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.start()
        try:
            while not self.stop.wait(SCHEDULER_TICK):
                try:
                    self.scheduler.tick()
                except Exception:  # the scheduler must outlive a bad moment of the database
                    log.exception("scheduler pass failed; retrying")
                self._watch_children()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for process in self.children.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 10
        for process in self.children.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        self.engine.dispose()
        log.info("cxrnode stopped")

"""`cxrnode serve`: the supervisor of one node.

It applies migrations, starts the embedded broker (unless BROKER_URL names one), the DICOM
listener processes (sharing the port), the monitor process (final reports over HL7 MLLP when
HL7_PORT is set, and the agreement sweep), optionally the Celery workers, and runs the scheduler
(:mod:`cxrnode.jobs.scheduler`) in the main thread. Children die with the supervisor
(PR_SET_PDEATHSIG); a watcher thread restarts one that exits unexpectedly.
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
from typing import Any

from cxrnode.db import make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.storage import clean_tmp
from cxrnode.jobs.broker import EmbeddedBroker, is_embedded
from cxrnode.jobs.scheduler import Scheduler
from cxrnode.monitor.service import run_monitor
from cxrnode.net.cap import AssociationCap
from cxrnode.net.listener import die_with_parent, run_listener
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

#: embedded mode: one node-side worker and one inference worker
WORKER_QUEUES = ("prepare,outputs,send", "infer")
#: seconds between two looks at the children
WATCH_SECONDS = 2.0


def prepare_data_dir(settings: Settings) -> None:
    for directory in (
        settings.instances_dir,
        settings.outputs_dir,
        settings.prepared_dir,
        settings.tmp_dir,
    ):
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


class Supervisor:
    """Owns the child processes and the scheduler of a node."""

    def __init__(self, settings: Settings, *, workers: bool = True) -> None:
        self.settings = settings
        self.workers = workers
        self.stop = threading.Event()
        self.context = multiprocessing.get_context("spawn")
        self.children: dict[str, Any] = {}
        self.engine = make_engine(settings.effective_database_url)
        self.reader = make_engine(settings.effective_database_url, read_only=True)
        self.broker: EmbeddedBroker | None = None
        # one cap for all listener processes (MAX_ASSOCIATIONS is node-wide)
        self.cap = AssociationCap(
            settings.max_associations, settings.effective_scp_processes, self.context
        )

    def _start_listener(self, index: int) -> None:
        name = f"listener-{index}"
        self.cap.reset(index)  # a dead listener's associations died with it
        process = self.context.Process(
            target=run_listener, args=(self.settings, self.cap, index), name=name, daemon=True
        )
        process.start()
        self.children[name] = process

    def _start_monitor(self) -> None:
        process = self.context.Process(
            target=run_monitor, args=(self.settings,), name="monitor", daemon=True
        )
        process.start()
        self.children["monitor"] = process

    def start(self) -> None:
        prepare_data_dir(self.settings)
        upgrade(self.engine)
        if is_embedded(self.settings):
            self.broker = EmbeddedBroker(self.settings, preexec_fn=die_with_parent).start()
        processes = self.settings.effective_scp_processes
        for index in range(processes):
            self._start_listener(index)
        self._start_monitor()
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
        if self.broker is not None and not self.broker.is_alive():
            log.error("the embedded broker exited with %s; restarting it", self.broker.exitcode)
            self.broker.start()
        for name, process in list(self.children.items()):
            if process.is_alive():
                continue
            log.error("%s exited with %s; restarting it", name, process.exitcode)
            if name.startswith("listener-"):
                self._start_listener(int(name.split("-")[1]))
            elif name == "monitor":
                self._start_monitor()
            elif isinstance(process, WorkerProcess):
                self.children[name] = WorkerProcess(process.queues)

    def _watch(self) -> None:
        while not self.stop.wait(WATCH_SECONDS):
            try:
                self._watch_children()
            except Exception:
                log.exception("restarting a child failed; trying again")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.start()
        watcher = threading.Thread(target=self._watch, name="watcher", daemon=True)
        watcher.start()
        try:
            scheduler = Scheduler(
                self.settings, make_sessionmaker(self.engine), make_sessionmaker(self.reader)
            )
            scheduler.run(self.stop)
        finally:
            self.stop.set()
            self.shutdown()

    def shutdown(self) -> None:
        children = list(self.children.values())
        for process in children:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 10
        for process in children:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        if self.broker is not None:  # last: the workers acknowledge through it
            self.broker.terminate()
            self.broker.join(10)
            self.broker.kill()
        self.engine.dispose()
        self.reader.dispose()
        log.info("cxrnode stopped")

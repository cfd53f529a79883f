"""`cxrnode serve`: the supervisor of one node.

It applies migrations, starts the embedded broker (unless BROKER_URL names one), the DICOM
listener processes (sharing the port), the admin web app (:mod:`cxrnode.web`, on HTTP_PORT),
optionally the Celery workers, and runs the scheduler (:mod:`cxrnode.jobs.scheduler`) in the
main thread. Children die with the supervisor (PR_SET_PDEATHSIG); a watcher thread restarts
one that exits unexpectedly. Before any child starts, the Prometheus multiprocess directory
is emptied and named in the environment the children inherit (:mod:`cxrnode.web.metrics`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import socket
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
from cxrnode.net.listener import die_with_parent, run_listener
from cxrnode.settings import Settings
from cxrnode.web.metrics import prepare_metrics_dir
from cxrnode.web.server import exposure_problem, run_web

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

    def _start_listener(self, index: int, processes: int) -> None:
        name = f"listener-{index}"
        process = self.context.Process(
            target=run_listener, args=(self.settings, processes), name=name, daemon=True
        )
        process.start()
        self.children[name] = process

    def _start_web(self) -> None:
        process = self.context.Process(
            target=run_web, args=(self.settings,), name="web", daemon=True
        )
        process.start()
        self.children["web"] = process

    def _check_web(self) -> None:
        """Refuse to start (exit 2) when the web app may not or cannot listen."""
        settings = self.settings
        problem = exposure_problem(settings)
        if problem is None:
            try:
                family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((settings.http_host, settings.http_port))
            except OSError as exc:
                problem = (
                    f"the admin web app cannot listen on {settings.http_host}:"
                    f"{settings.http_port} ({exc.strerror}); choose another CXRNODE_HTTP_PORT"
                )
        if problem:
            log.error("%s", problem)
            raise SystemExit(2)

    def start(self) -> None:
        self._check_web()
        prepare_data_dir(self.settings)
        upgrade(self.engine)
        prepare_metrics_dir(self.settings)  # before any child: they inherit its name
        if is_embedded(self.settings):
            self.broker = EmbeddedBroker(self.settings, preexec_fn=die_with_parent).start()
        processes = self.settings.effective_scp_processes
        for index in range(processes):
            self._start_listener(index, processes)
        self._start_web()
        if self.workers:
            for queues in WORKER_QUEUES:
                self.children[f"worker-{queues}"] = WorkerProcess(queues)
        log.info(
            "cxrnode %s listening on %s:%d with %d processes; admin web app on http://%s:%d",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.settings.dicom_port,
            processes,
            self.settings.http_host,
            self.settings.http_port,
        )

    def _watch_children(self) -> None:
        processes = self.settings.effective_scp_processes
        if self.broker is not None and not self.broker.is_alive():
            log.error("the embedded broker exited with %s; restarting it", self.broker.exitcode)
            self.broker.start()
        for name, process in list(self.children.items()):
            if process.is_alive():
                continue
            log.error("%s exited with %s; restarting it", name, process.exitcode)
            if name.startswith("listener-"):
                self._start_listener(int(name.split("-")[1]), processes)
            elif name == "web":
                self._start_web()
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

"""`cxrnode serve`: the supervisor of one node.

It applies migrations, starts the DICOM listener processes (sharing the port), optionally the
Celery workers, and runs the scheduler loop (study grouping, job hand-off, reconciler) in the
main process. Children die with the supervisor (PR_SET_PDEATHSIG) and are restarted if they
exit unexpectedly.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from cxrnode.db import make_engine, make_sessionmaker
from cxrnode.migrate import upgrade
from cxrnode.scp import run_listener
from cxrnode.settings import Settings
from cxrnode.storage import clean_tmp
from cxrnode.study import settle_due_studies

log = logging.getLogger(__name__)

SCHEDULER_TICK = 0.5  # seconds; settle precision is about this


def prepare_data_dir(settings: Settings) -> None:
    for directory in (settings.instances_dir, settings.outputs_dir, settings.tmp_dir):
        directory.mkdir(parents=True, exist_ok=True)
    removed = clean_tmp(settings.tmp_dir)
    if removed:
        log.info("removed %d partial files left by an earlier crash", removed)


class Supervisor:
    """Owns the child processes and the scheduler loop of a node."""

    def __init__(
        self,
        settings: Settings,
        *,
        extra_children: list[tuple[str, Callable[[], Any]]] | None = None,
        on_tick: list[Callable[[], None]] | None = None,
    ) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.context = multiprocessing.get_context("spawn")
        self.children: dict[str, multiprocessing.process.BaseProcess] = {}
        self.extra_children = extra_children or []
        self.on_tick = on_tick or []
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)

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
        for name, factory in self.extra_children:
            self.children[name] = factory()
        log.info(
            "cxrnode %s listening on %s:%d with %d processes",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.settings.dicom_port,
            processes,
        )

    def tick(self) -> None:
        with self.sessions() as session:
            settle_due_studies(session)
        for callback in self.on_tick:
            callback()

    def _watch_children(self) -> None:
        processes = self.settings.effective_scp_processes
        for name, process in list(self.children.items()):
            if process.is_alive():
                continue
            log.error("%s exited with %s; restarting it", name, process.exitcode)
            if name.startswith("listener-"):
                self._start_listener(int(name.split("-")[1]), processes)
            else:
                for extra_name, factory in self.extra_children:
                    if extra_name == name:
                        self.children[name] = factory()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.start()
        try:
            while not self.stop.wait(SCHEDULER_TICK):
                try:
                    self.tick()
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

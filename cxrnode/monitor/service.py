"""The monitor of ``cxrnode serve``: the MLLP listener (when ``HL7_PORT`` is set) and the
scoring sweep (every ``MONITOR_INTERVAL_SECONDS``), on one asyncio loop in a thread of the
supervisor.

Database work runs on one worker thread, so the monitor writes one thing at a time (what
SQLite wants, and plenty for report traffic). The supervisor's watcher restarts the thread if
it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.orm import sessionmaker

from cxrnode.db import make_engine, make_sessionmaker
from cxrnode.hl7.listener import MllpListener
from cxrnode.hl7.receive import Hl7Receiver, Reception
from cxrnode.monitor.scoring import score_studies, sweep
from cxrnode.settings import Settings

__all__ = ["Monitor", "run_monitor_thread"]

log = logging.getLogger(__name__)


class Monitor:
    """One monitor: :meth:`run` until ``stop`` is set."""

    def __init__(self, settings: Settings, sessions: sessionmaker, readers: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.readers = readers
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-db")
        self.listener: MllpListener | None = None

    def _score(self, reception: Reception) -> None:
        score_studies(self.sessions, reception.study_ids)

    def _sweep(self) -> None:
        try:
            sweep(self.sessions, self.readers)
        except Exception:  # the database may be away for a moment; the next sweep retries
            log.exception("monitor sweep failed")

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        if self.settings.hl7_port:
            receiver = Hl7Receiver(self.settings, self.sessions)
            self.listener = MllpListener(self.settings, receiver, self.executor, self._score)
            await self.listener.start()
        try:
            while not stop.is_set():
                await loop.run_in_executor(self.executor, self._sweep)
                with contextlib.suppress(TimeoutError):  # the interval passed: sweep again
                    await asyncio.wait_for(stop.wait(), self.settings.monitor_interval_seconds)
        finally:
            if self.listener is not None:
                await self.listener.close()
            self.executor.shutdown(wait=True)


def run_monitor_thread(settings: Settings, stop: threading.Event) -> None:
    """Body of the supervisor's ``monitor`` thread: run until ``stop`` is set.

    A thread of `cxrnode serve`, not a process of its own: the sweep and the MLLP listener
    are a few database writes a minute, not worth an interpreter (about 100 MB). Its own
    engines and asyncio loop keep it apart from the scheduler beside it.
    """
    engine = make_engine(settings.effective_database_url)
    reader = make_engine(settings.effective_database_url, read_only=True)
    monitor = Monitor(settings, make_sessionmaker(engine), make_sessionmaker(reader))

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        waiter = threading.Thread(
            target=lambda: (stop.wait(), loop.call_soon_threadsafe(stopped.set)),
            name="monitor-stop",
            daemon=True,
        )
        waiter.start()
        await monitor.run(stopped)

    try:
        asyncio.run(main())
    finally:
        engine.dispose()
        reader.dispose()

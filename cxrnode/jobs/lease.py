"""One node at a time runs the singletons (settling studies, reconciling lost work, deciding
which studies retention purges) when several node hosts share one PostgreSQL database.

The lease is a PostgreSQL session-level advisory lock (``pg_try_advisory_lock``) held on a
connection of its own. It lasts exactly as long as the holder's session: a node that stops
or dies closes it at once, and one cut off from the database loses it when the server's
keepalives give up on the session (set here to about 25 s). Every other node tries to take
it on each scheduler pass (at least every :data:`CHECK_SECONDS`), so the singletons move to
a survivor within 30 s. With SQLite there is one node by construction: the lease is always
held.

Sending due outputs is not a singleton: claiming them is a compare-and-set with
``SKIP LOCKED`` (:mod:`cxrnode.outputs.outbox`), so any number of nodes may do it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from cxrnode.db import network_connect_args

log = logging.getLogger(__name__)

#: The advisory lock's key: "cxrnode" in ASCII, so it is recognisable in pg_locks.
LEASE_KEY = 0x6378726E6F6465
#: The longest a node that does not hold the lease waits before trying again.
CHECK_SECONDS = 5.0
#: Server-side keepalives of the lease's session: a holder cut off from the database loses
#: the lease after about idle + interval * count seconds.
SESSION_KEEPALIVES = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
}


class Lease:
    """The singletons' lease for one node process; :meth:`held` is cheap enough per pass."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.always = not database_url.startswith("postgresql")
        self._engine: Any = None
        self._conn: Any = None
        self._was_held = False
        self._lock = threading.Lock()  # the scheduler's and the retention thread's

    def held(self) -> bool:
        """Whether this node holds the lease now (taking it when free). Never raises."""
        if self.always:
            return True
        with self._lock:
            return self._check()

    def _check(self) -> bool:
        try:
            if self._conn is None:
                self._take()
            else:
                self._conn.execute(text("SELECT 1"))  # still our session, so still our lock
        except Exception as exc:  # the database is away: no lease until it answers
            log.debug("lease: %s", type(exc).__name__)
            self._drop()
        holds = self._conn is not None
        if holds != self._was_held:
            log.info(
                "this node %s the singletons (settling, reconciling, retention)",
                "now runs" if holds else "no longer runs",
            )
            self._was_held = holds
        return holds

    def _take(self) -> None:
        if self._engine is None:
            self._engine = create_engine(
                self.url, poolclass=NullPool, connect_args=network_connect_args(self.url)
            )
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            for name, value in SESSION_KEEPALIVES.items():
                conn.execute(text(f"SET {name} = {int(value)}"))
            taken = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEASE_KEY})
            if taken.scalar():
                self._conn = conn
                return
        except Exception:
            conn.close()
            raise
        conn.close()  # another node holds it

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the lease's connection failed", exc_info=True)
            self._conn = None

    def release(self) -> None:
        """Give the lease up (closing its session frees the lock)."""
        with self._lock:
            self._drop()
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

"""The singletons' lease: one node at a time settles and reconciles; when the holder dies the
lease moves to a survivor (PostgreSQL advisory lock; real processes, a real database)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobcore import Node as Core
from services import fresh_database, wait_for
from sqlalchemy import select

from cxrnode.db import Job, make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.receive import Ingest
from cxrnode.jobs.lease import Lease
from cxrnode.jobs.scheduler import Scheduler
from cxrnode.settings import Settings

HOLDER = """
import sys, time
from cxrnode.jobs.lease import Lease
lease = Lease(sys.argv[1])
assert lease.held()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    with fresh_database(pg_admin_url) as url:
        yield url


def test_one_holder_at_a_time_and_a_dead_holders_lease_moves_to_the_survivor(pg_url: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, pg_url], stdout=subprocess.PIPE, text=True
    )
    survivor = Lease(pg_url)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not survivor.held()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        killed = time.monotonic()
        wait_for(survivor.held, 30, "the survivor to take the lease", interval=0.5)
        print(f"lease moved {time.monotonic() - killed:.1f} s after the holder was killed")
        assert survivor.held()  # and keeps it
        other = Lease(pg_url)
        assert not other.held()
        survivor.release()
        assert other.held()
        other.release()
    finally:
        if holder.poll() is None:
            holder.kill()
        survivor.release()


def test_sqlite_has_one_node_so_its_lease_is_always_held(tmp_path: Path) -> None:
    assert Lease(f"sqlite:///{tmp_path / 'node.db'}").held()


def test_a_scheduler_without_the_lease_leaves_settling_to_the_holder(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=redis_url + "/0",
        min_free_disk_mb=1,
        settle_seconds=0,
        receive_hold_seconds=0,  # settle at once: this test is about who settles, not when
    )
    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    (tmp_path / "sources").mkdir()
    core = Core(settings, sessions, sessions, Ingest(settings, sessions), tmp_path / "sources")
    core.receive(modality="CR")
    holder = Lease(pg_url)
    assert holder.held()
    follower = Scheduler(settings, sessions, sessions)
    try:
        assert follower.run_once() <= 5.0  # it looks again soon, to take over in time
        with sessions() as session:
            assert session.scalars(select(Job)).all() == []  # the holder settles, not it
        holder.release()
        follower.run_once()
        with sessions() as session:
            assert len(session.scalars(select(Job)).all()) == 1
    finally:
        holder.release()
        follower.lease.release()
        follower.dispatch.close()
        core.ingest.reader.dispose()
        engine.dispose()

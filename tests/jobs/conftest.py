"""In-process fixtures for the job core: a migrated database, a node's settings, a real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from jobcore import Node

from cxrnode.db import make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.receive import Ingest
from cxrnode.settings import Settings


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def factory(**values: object) -> Settings:
        values.setdefault("data_dir", tmp_path / "data")
        values.setdefault("database_url", f"sqlite:///{tmp_path / 'node.db'}")
        values.setdefault("min_free_disk_mb", 1)
        values.setdefault("settle_seconds", 0)
        return Settings(**values)

    return factory


@pytest.fixture
def node(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[Node]:
    settings = make_settings()
    engine = make_engine(settings.effective_database_url)
    reader = make_engine(settings.effective_database_url, read_only=True)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    (tmp_path / "sources").mkdir()
    yield Node(
        settings,
        sessions,
        make_sessionmaker(reader),
        Ingest(settings, sessions),
        tmp_path / "sources",
    )
    engine.dispose()
    reader.dispose()


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()

"""High-availability tests share the job core's in-process node and the web tests' PACS."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for folder in ("jobs", "web"):
    if str(_TESTS / folder) not in sys.path:
        sys.path.insert(0, str(_TESTS / folder))

from jobcore import Node  # noqa: E402
from netns import Network  # noqa: E402

from cxrnode.db import make_engine, make_sessionmaker  # noqa: E402
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.ingest.receive import Ingest  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Node]:
    """A node's settings, migrated SQLite database and ingest, without its processes."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        min_free_disk_mb=1,
        settle_seconds=0,
    )
    engine = make_engine(settings.effective_database_url)
    reader = make_engine(settings.effective_database_url, read_only=True)
    upgrade(engine)
    (tmp_path / "sources").mkdir()
    yield Node(
        settings,
        make_sessionmaker(engine),
        make_sessionmaker(reader),
        Ingest(settings, make_sessionmaker(engine)),
        tmp_path / "sources",
    )
    engine.dispose()
    reader.dispose()


@pytest.fixture
def network() -> Iterator[Network]:
    """A test network of namespaces (see ``netns.py``), removed when the test ends."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the namespace tests run as root with iproute2 (as here and in CI)")
    with Network() as net:
        yield net

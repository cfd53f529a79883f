"""Shared fixtures: real databases (SQLite and PostgreSQL), Redis, and `cxrnode serve` nodes."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import BIN, Node, fresh_database, node_env, postgres_server, redis_server  # noqa: E402

#: Tests in these folders run whole nodes, peers or browsers.
SLOW_FOLDERS = frozenset({"e2e", "pipeline", "viewer", "web", "monitor", "faults"})
#: Fixtures that start a node or a peer process. (``node`` in tests/jobs is a node's settings,
#: database and ingest in this process: its tests are fast and belong to the fast lane.)
SLOW_FIXTURES = frozenset({"make_node", "e2e_node", "orthanc", "storescp_peer"})


#: Folders whose tests share one session fixture (a node with its peers, a viewer): under
#: pytest-xdist each runs on one worker, so the fixture starts once.
SHARED_FOLDERS = frozenset({"e2e", "viewer", "web"})
#: Under pytest-xdist, tests of these folders are handed out first, longest first, so the
#: long ones do not start last and leave the other workers idle at the end.
FIRST_FOLDERS = ("faults", "e2e", "web", "viewer", "pipeline", "deploy", "monitor", "node")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by what they need, so `scripts/test --fast` (``-m "not slow"``) and
    ``-m postgres`` / ``-m redis`` select them without anyone remembering to mark them."""
    # xdist's workers collect the tests, with numprocesses reset to None: workerinput says
    # this is one of them (the controller itself collects nothing)
    parallel = bool(getattr(config.option, "numprocesses", None)) or hasattr(config, "workerinput")
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        folder = Path(str(item.fspath)).parent.name
        if parallel and folder in SHARED_FOLDERS:
            item.add_marker(pytest.mark.xdist_group(folder))
        if folder in SLOW_FOLDERS or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        callspec = getattr(item, "callspec", None)
        params = set(map(str, callspec.params.values())) if callspec else set()
        if (
            "pg_admin_url" in fixtures
            or "postgresql" in params
            or any("postgres" in p for p in params)
        ):
            item.add_marker(pytest.mark.postgres)
        if "redis_url" in fixtures or any("redis" in p for p in params):
            item.add_marker(pytest.mark.redis)
    if parallel:

        def rank(item: pytest.Item) -> int:
            folder = Path(str(item.fspath)).parent.name
            return FIRST_FOLDERS.index(folder) if folder in FIRST_FOLDERS else len(FIRST_FOLDERS)

        items.sort(key=rank)  # stable: each folder keeps its own order


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CXR-LLaVA v2 checkpoint in the published format (random weights, fixed seed),
    written once per run by `cxrnode model make-tiny` (torch stays out of pytest) and shared
    by the pytest-xdist workers; a test must not change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    directory, done = root / "tiny-model-shared", root / "tiny-model-shared.done"
    with open(root / "tiny-model-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            subprocess.run(
                [str(BIN / "cxrnode"), "model", "make-tiny", str(directory)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            done.touch()
    return directory


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    with fresh_database(admin) as url:
        yield url


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Factory of `cxrnode serve` subprocesses; all are stopped after the test."""
    nodes: list[Node] = []

    def factory(
        *args: str, start: bool = True, data_dir: Path | None = None, **settings: str
    ) -> Node:
        directory = data_dir or tmp_path / f"node{len(nodes)}"
        node = Node(directory, node_env(directory, **settings), list(args))
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        node.stop()

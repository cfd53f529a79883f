"""Real services for tests: PostgreSQL, Redis and `cxrnode serve` processes.

Each helper uses the server already running on its standard loopback port when there is one
and otherwise starts its own on a free port (a user's fresh machine has neither), so the
suite runs the same on a developer laptop, on CI and here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# ------------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin URL (``postgresql+psycopg://user@host:port/postgres``)."""
    if port_open(5432):
        yield "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError(
            "PostgreSQL is neither running on 127.0.0.1:5432 nor installed "
            "(apt-get install postgresql); .ci/run installs it"
        )
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="cxrnode-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run(
        [*prefix, initdb, "-A", "trust", "-U", "postgres", "-D", str(data)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *prefix,
            pg_ctl,
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """Create an empty database for one test and drop it afterwards."""
    import psycopg

    name = f"cxrnode_test_{uuid.uuid4().hex[:10]}"
    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------------------------ Redis


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Yield the URL of a Redis of the suite's own (tests FLUSHALL it), started on a free port;
    without the redis-server binary, the server already answering on 6379."""
    binary = shutil.which("redis-server")
    if not binary:
        if port_open(6379):
            yield "redis://127.0.0.1:6379"
            return
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------------- the node


@dataclass
class Node:
    """A `cxrnode serve` subprocess with its own data directory and ports."""

    data_dir: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def port(self) -> int:
        return int(self.env["CXRNODE_DICOM_PORT"])

    @property
    def ae_title(self) -> str:
        return self.env.get("CXRNODE_AE_TITLE", "CXRNODE")

    def start(self, wait: bool = True) -> Node:
        self.log_path = self.data_dir / f"serve-{int(time.time() * 1000)}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "cxrnode"), "serve", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"cxrnode serve exited early:\n{self.log()}")
            answer = echoscu(self.port, self.ae_title)
            # accepted, or rejected by access control: either way the listener answers
            return answer.returncode == 0 or "Association Rejected" in answer.stderr

        wait_for(ready, timeout, "cxrnode serve to answer an association", interval=0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill9(self) -> None:
        """SIGKILL the whole process group, as a power cut would for the node's processes."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill9()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "cxrnode"), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"cxrnode {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc


def node_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env.update(
        {
            "CXRNODE_DATA_DIR": str(data_dir),
            "CXRNODE_DICOM_PORT": str(free_port()),
            "CXRNODE_HTTP_PORT": str(free_port()),
            "CXRNODE_SETTLE_SECONDS": "1",
            "CXRNODE_MIN_FREE_DISK_MB": "64",
            "CXRNODE_SCP_PROCESSES": "2",
            "PATH": f"{BIN}:{env.get('PATH', '')}",
        }
    )
    env.update({f"CXRNODE_{k.upper()}": v for k, v in overrides.items()})
    return env


# ------------------------------------------------------------------------------------ dcmtk


def echoscu(
    port: int, called: str = "CXRNODE", calling: str = "ECHOSCU", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/echoscu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def storescu(
    port: int,
    *files: Path,
    called: str = "CXRNODE",
    calling: str = "STORESCU",
    extra: tuple[str, ...] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """dcmtk storescu with verbose output, proposing the files' own transfer syntaxes."""
    return subprocess.run(
        [
            "/usr/bin/storescu",
            "-v",
            "-aet",
            calling,
            "-aec",
            called,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )

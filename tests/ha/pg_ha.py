"""A PostgreSQL primary and its streaming replica, made by the test (initdb, pg_basebackup -R)
from the Debian binaries, on free loopback ports, in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from services import _pg_bin, free_port, wait_for


@dataclass
class PgPair:
    """Start with :meth:`start`; :meth:`kill_primary` and :meth:`promote` are the failover."""

    database: str = "cxrnode"
    primary_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cxrnode-pgha-")))

    @property
    def prefix(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        """A libpq multi-host URL: whichever host accepts writes."""
        return (
            f"postgresql+psycopg://postgres@/{self.database}?host=127.0.0.1:{self.primary_port}"
            f"&host=127.0.0.1:{self.replica_port}&target_session_attrs=read-write"
            "&connect_timeout=3"
        )

    def _conninfo(self, port: int, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={port} user=postgres dbname={database} connect_timeout=3"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=120)

    def _start(self, data: Path, port: int, *options: str) -> None:
        extra = " ".join(f"-c {o}" for o in options)
        self._run(
            _pg_bin("pg_ctl") or "pg_ctl", "-D", str(data), "-w", "-l", str(data.parent / f"{data.name}.log"),
            "-o", f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 {extra}", "start",
        )  # fmt: skip

    def start(self) -> PgPair:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        primary, replica = self.root / "primary", self.root / "replica"
        self._run(
            _pg_bin("initdb") or "initdb", "-A", "trust", "-U", "postgres", "-D", str(primary)
        )
        # synchronous: a commit the node acknowledges is on the replica too, so promoting it
        # loses nothing acknowledged (docs/operations.md)
        self._start(primary, self.primary_port, "synchronous_standby_names='*'")
        self._run(
            _pg_bin("pg_basebackup") or "pg_basebackup", "-D", str(replica), "-R", "-X", "stream",
            "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
        )  # fmt: skip
        self._start(replica, self.replica_port)
        with psycopg.connect(self._conninfo(self.primary_port), autocommit=True) as conn:
            wait_for(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                    ).fetchone()[0]
                    == 1
                ),
                30,
                "the replica to stream synchronously",
                interval=0.3,
            )
            conn.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def kill_primary(self) -> None:
        """Stop the primary the way a crash does (no shutdown checkpoint)."""
        self._run(
            _pg_bin("pg_ctl") or "pg_ctl",
            "-D",
            str(self.root / "primary"),
            "-m",
            "immediate",
            "stop",
        )

    def promote(self) -> None:
        self._run(_pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.root / "replica"), "-w", "promote")

    def stop(self) -> None:
        for name in ("primary", "replica"):
            subprocess.run(
                [
                    *self.prefix,
                    _pg_bin("pg_ctl") or "pg_ctl",
                    "-D",
                    str(self.root / name),
                    "-m",
                    "immediate",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)

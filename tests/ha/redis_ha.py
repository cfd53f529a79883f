"""A Redis master, its replica and three Sentinels, as real processes on free loopback ports."""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
from services import free_port, port_open, wait_for

MASTER_NAME = "cxrbroker"


def _sentinel_command(config: Path) -> list[str]:
    """Debian's redis-sentinel, or the same server binary in sentinel mode."""
    sentinel = shutil.which("redis-sentinel")
    if sentinel:
        return [sentinel, str(config)]
    server = shutil.which("redis-server")
    if not server:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return [server, str(config), "--sentinel"]


@dataclass
class SentinelSet:
    """Start with :meth:`start`; :meth:`kill_master` is the fault; :meth:`stop` cleans up."""

    directory: Path
    down_after_ms: int = 1000
    master_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    def _server(self, name: str, port: int, *extra: str) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        workdir = self.directory / name
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs[name] = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
             "--save", "", "--appendonly", "no", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: port_open(port), 15, f"redis {name}")

    def start(self) -> SentinelSet:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._server("master", self.master_port)
        self._server(
            "replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port)
        )
        for index, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel-{index}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self.procs[f"sentinel-{index}"] = subprocess.Popen(
                _sentinel_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        for port in self.sentinel_ports:
            wait_for(lambda p=port: port_open(p), 15, "a sentinel")
        # the replica is in sync and every Sentinel sees it and the others
        master = redis_lib.Redis(port=self.master_port)
        wait_for(lambda: master.info("replication").get("connected_slaves") == 1, 30, "replica")
        for port in self.sentinel_ports:
            sentinel = redis_lib.Redis(port=port)
            wait_for(
                lambda s=sentinel: s.sentinel_master(MASTER_NAME).get("num-other-sentinels") == 2,
                30,
                "the sentinels to know each other",
                interval=0.3,
            )
        return self

    def master_address(self) -> tuple[str, int]:
        sentinel = redis_lib.Redis(port=self.sentinel_ports[0])
        host, port = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
        return str(host), int(port)

    def replica_has(self, key: str) -> bool:
        return bool(redis_lib.Redis(port=self.replica_port).exists(key))

    def kill_master(self) -> None:
        """SIGKILL the master (nothing on disk: what was not replicated is gone)."""
        self.procs["master"].send_signal(signal.SIGKILL)
        self.procs["master"].wait(10)

    def wait_promoted(self, timeout: float = 60) -> None:
        wait_for(
            lambda: self.master_address()[1] == self.replica_port,
            timeout,
            "the Sentinels to promote the replica",
            interval=0.3,
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

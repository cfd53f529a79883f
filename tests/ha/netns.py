"""Real hosts for the tests: Linux network namespaces joined by a bridge.

Each :class:`Network` makes a "switch" namespace holding a bridge, and one namespace per host,
joined to the bridge by a veth pair; each host gets an address in a private range that exists
only inside these namespaces (nothing is added to the namespace the tests run in, so no
traffic can leave them). Names carry a random tag, so parallel runs do not collide, and
:meth:`Network.close` removes everything (processes first, then the namespaces, which takes
their veths and the bridge with them), also after a failure.

Faults: :meth:`Network.partition` takes a host's link down at the switch (packets vanish, no
reset: what a pulled cable or a dead switch port does); :meth:`Network.heal` brings it back;
:meth:`Network.impair` adds ``tc netem`` latency and loss on a host's link (it needs the
kernel's ``sch_netem``, which some containers lack: it then raises with that said).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dicomgen
import pydicom


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    link: str  # the veth end on the switch

    def command(self, *args: str) -> list[str]:
        """``args`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]


@dataclass
class Network:
    tag: str = field(default_factory=lambda: "cx" + uuid.uuid4().hex[:6])
    subnet: str = field(
        default_factory=lambda: f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    )
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def __enter__(self) -> Network:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        namespace = f"{self.tag}-{name}"
        inner, outer = f"{self.tag}h{index}", f"{self.tag}s{index}"
        ip("netns", "add", namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "link", "add", inner, "type", "veth", "peer", "name", outer,
           "netns", self.switch)  # fmt: skip
        ip("-n", self.switch, "link", "set", outer, "master", "br0")
        ip("-n", self.switch, "link", "set", outer, "up")
        address = f"{self.subnet}.{10 + index}"
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inner)
        ip("-n", namespace, "link", "set", inner, "up")
        host = Host(name, namespace, address, outer)
        self.hosts[name] = host
        return host

    def start(self, host: Host, *args: str, **popen: object) -> subprocess.Popen:
        """A process inside ``host``, stopped by :meth:`close`."""
        proc = subprocess.Popen(host.command(*args), start_new_session=True, **popen)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def run(self, host: Host, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(host.command(*args), capture_output=True, text=True, timeout=timeout)

    def partition(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", host.link, "down")

    def heal(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", host.link, "up")

    def impair(self, host: Host, delay_ms: float, loss_percent: float) -> None:
        done = subprocess.run(
            ["ip", "netns", "exec", self.switch, "tc", "qdisc", "replace", "dev", host.link,
             "root", "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"tc netem is not available here ({done.stderr.strip()}): the kernel needs "
                "sch_netem for latency and loss"
            )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for host in self.hosts.values():
            # anything still inside (a daemon a command left behind) goes with its namespace
            pids = subprocess.run(
                ["ip", "netns", "pids", host.namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


class NsStream:
    """Studies sent from inside the node's namespace; unacknowledged ones are sent again."""

    def __init__(
        self,
        net: Network,
        host: Host,
        port: int,
        directory: Path,
        count: int,
        every: float = 1.0,
        seed: int = 500,
    ) -> None:
        self.net, self.host, self.port, self.directory = net, host, port, directory
        self.count, self.every, self.seed = count, every, seed
        self.acknowledged: list[str] = []  # SOP Instance UIDs answered 0x0000
        self.studies: list[str] = []
        self.refused = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            path = dicomgen.make_chest(
                self.directory / f"s{index}.dcm", modality="CR", seed=self.seed + index
            )
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for _ in range(120):
                answer = self.net.run(
                    self.host, "/usr/bin/storescu", "-v", "-to", "60", "-td", "60",
                    "-aec", "CXRNODE", "127.0.0.1", str(self.port), str(path),
                )  # fmt: skip
                if "Received Store Response (Success)" in answer.stdout + answer.stderr:
                    self.acknowledged.append(str(ds.SOPInstanceUID))
                    self.studies.append(str(ds.StudyInstanceUID))
                    break
                self.refused += 1
                time.sleep(1.0)
            time.sleep(self.every)

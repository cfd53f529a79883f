"""Real hosts for the tests: Linux network namespaces joined by a bridge.

Each :class:`Network` makes a "switch" namespace holding a bridge, and one namespace per host,
joined to the bridge by a veth pair; each host gets an address in a private range that exists
only inside these namespaces (nothing is added to the namespace the tests run in, so no
traffic can leave them). Names carry a random tag, so parallel runs do not collide, and
:meth:`Network.close` removes everything (processes first, then the namespaces, which takes
their veths and the bridge with them), also after a failure.

Faults: :meth:`Network.partition` takes a host's link down at the switch (packets vanish, no
reset: what a pulled cable or a dead switch port does); :meth:`Network.heal` brings it back;
:meth:`Network.impair` adds latency and loss on the frames the switch sends to a host (so
with every host impaired, each one-way path between two hosts carries the delay and loss
once). It uses ``tc netem`` on the host's switch port where the kernel has ``sch_netem``;
where it has not (as on the kernel these tests were written on, which also has no iptables
or nft), it falls back to :meth:`Network.emulate`: the host's link is rerouted through
``linkemu.py``, a userspace process in the switch namespace that forwards frames between a
TAP device in the host's namespace (which takes over the veth's address and MAC address)
and a TAP device on the bridge, holding each frame for the delay and dropping the given
fraction at random, order kept per direction. :meth:`Network.link_stats` reads its counters.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dicomgen
import pydicom

LINKEMU = Path(__file__).resolve().parent / "linkemu.py"


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    link: str  # the host's port on the switch: its veth end there, or the emulator's TAP
    inner: str = ""  # the host's own interface

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
    emulators: dict[str, subprocess.Popen] = field(default_factory=dict)
    generation: int = 0  # of the emulators' parameters
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cxrnode-net-")))

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
        host = Host(name, namespace, address, outer, inner)
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
        """``delay_ms`` and ``loss_percent`` on the frames the switch sends to ``host``:
        ``tc netem`` where the kernel has it, else the userspace emulator."""
        if host.name not in self.emulators:
            done = subprocess.run(
                ["ip", "netns", "exec", self.switch, "tc", "qdisc", "replace", "dev", host.link,
                 "root", "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if done.returncode == 0:
                return
            if "unknown" not in done.stderr.lower():
                raise RuntimeError(f"tc netem on {host.link}: {done.stderr.strip()}")
        self.emulate(host, to_host=(delay_ms, loss_percent))

    def emulate(
        self,
        host: Host,
        to_host: tuple[float, float] = (0, 0),
        from_host: tuple[float, float] = (0, 0),
        seed: int | None = None,
    ) -> None:
        """Route ``host``'s link through the userspace emulator (``linkemu.py``), with
        (delay_ms, loss_percent) per direction; called again, it changes them in place."""
        params = self.workdir / f"{host.name}.json"
        self.generation += 1
        values: dict[str, object] = {
            "to_host": to_host, "from_host": from_host, "generation": self.generation
        }  # fmt: skip
        if seed is not None:
            values["seed"] = seed
        params.write_text(json.dumps(values))
        running = self.emulators.get(host.name)
        if running is not None:  # change it in place, and return once it has taken them
            running.send_signal(signal.SIGHUP)
            self._wait_stats(host, lambda stats: stats["generation"] == self.generation)
            return
        index = host.inner.removeprefix(f"{self.tag}h")
        host_tap, switch_tap = f"{self.tag}e{index}", f"{self.tag}t{index}"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, str(LINKEMU), str(params),
             host_tap, switch_tap],
            stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.emulators[host.name] = proc
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], 30)[0] or proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the link emulator for {host.name} did not start")
        shown = subprocess.run(
            ["ip", "-n", host.namespace, "-j", "link", "show", host.inner],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        mac = json.loads(shown.stdout)[0]["address"]
        # the TAP takes over the veth's MAC and address, so neighbours' ARP entries stay right
        ip("-n", self.switch, "link", "set", host_tap, "netns", host.namespace)
        ip("-n", host.namespace, "link", "set", host_tap, "address", mac)
        ip("-n", host.namespace, "addr", "del", f"{host.address}/24", "dev", host.inner)
        ip("-n", host.namespace, "link", "set", host.inner, "down")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host_tap)
        ip("-n", host.namespace, "link", "set", host_tap, "up")
        ip("-n", self.switch, "link", "set", host.link, "nomaster")
        ip("-n", self.switch, "link", "set", switch_tap, "master", "br0")
        ip("-n", self.switch, "link", "set", switch_tap, "up")
        host.link, host.inner = switch_tap, host_tap

    def link_stats(self, host: Host) -> dict[str, dict[str, int]]:
        """The emulator's frame counters for ``host`` (per direction: read, dropped,
        written, write_errors), asked for now (written within half a second)."""
        path = self.workdir / f"{host.name}.json.stats"
        serial = json.loads(path.read_text())["serial"]
        self.emulators[host.name].send_signal(signal.SIGUSR1)
        stats = self._wait_stats(host, lambda stats: stats["serial"] > serial)
        return {k: v for k, v in stats.items() if k in ("to_host", "from_host")}

    def _wait_stats(self, host: Host, done: Callable[[dict], bool]) -> dict:
        path = self.workdir / f"{host.name}.json.stats"
        deadline = time.monotonic() + 5
        while not done(stats := json.loads(path.read_text())):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the link emulator for {host.name} does not answer")
            time.sleep(0.02)
        return stats

    def close(self) -> None:
        # the links (emulators) last: a process that exits closes its connections, and a
        # peer that never sees the FIN (a database in smart shutdown) would wait for it
        for group in (self.procs, list(self.emulators.values())):
            for proc in group:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
            for proc in group:
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
        shutil.rmtree(self.workdir, ignore_errors=True)


class NsStream:
    """Studies sent from inside ``host``'s namespace to the node at ``address`` (by default
    the node itself, on ``host``); unacknowledged ones are sent again."""

    def __init__(
        self,
        net: Network,
        host: Host,
        port: int,
        directory: Path,
        count: int,
        every: float = 1.0,
        seed: int = 500,
        address: str = "127.0.0.1",
    ) -> None:
        self.net, self.host, self.port, self.directory = net, host, port, directory
        self.address = address
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
                    "-aec", "CXRNODE", self.address, str(self.port), str(path),
                )  # fmt: skip
                if "Received Store Response (Success)" in answer.stdout + answer.stderr:
                    self.acknowledged.append(str(ds.SOPInstanceUID))
                    self.studies.append(str(ds.StudyInstanceUID))
                    break
                self.refused += 1
                time.sleep(1.0)
            time.sleep(self.every)

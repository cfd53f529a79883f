"""A userspace link emulator: latency and loss where the kernel has no ``sch_netem``.

Run as a script inside the switch namespace (standard library only)::

    python linkemu.py PARAMS HOST_TAP SWITCH_TAP

It creates two TAP devices and forwards every Ethernet frame between them: frames read from
SWITCH_TAP (the bridge sending towards the host) go to HOST_TAP, frames read from HOST_TAP
go to SWITCH_TAP. Each direction has its own delay and loss, read from the JSON file PARAMS
(``{"to_host": [delay_ms, loss_percent], "from_host": [delay_ms, loss_percent], "seed": n}``)
at start and again on SIGHUP. A frame is dropped with probability loss_percent / 100, drawn
independently per frame, or held for delay_ms in a per-direction FIFO and then written out,
so frames keep their order within a direction. Once both devices exist the emulator prints
``ready``; the harness then moves HOST_TAP into the host's namespace (the open file keeps
working across the move). Counters (frames read, dropped, written, write errors, per
direction) are written to ``PARAMS.stats`` twice a second, on SIGUSR1 and on exit;
SIGTERM stops it.

``python tests/ha/linkemu.py measure`` (as root, with ping installed) measures it between two
namespace hosts: ping RTT and loss and a bulk TCP copy, over plain veths, through the
emulator unimpaired, and with both links at 20 ms and 1 % loss.

TAP devices without ``IFF_VNET_HDR`` and without ``TUNSETOFFLOAD`` get neither checksum
offload nor segmentation offload: the kernel hands over wire-sized frames with complete
checksums, so a frame copied from one to the other is valid as it stands and loss applies to
frames as a wire would carry them.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME = 65536

# A peer for the measurements, run inside a host's namespace: ``echo ADDRESS PORT`` answers
# every byte back, ``sink ADDRESS PORT`` reads a TCP stream to its end and answers how many
# bytes; ``udp ADDRESS PORT`` prints the sequence numbers of the datagrams it received
# (until a second with none); the clients: ``rtt ADDRESS PORT N``, ``bulk ADDRESS PORT
# BYTES``, ``send ADDRESS PORT N``.
PEER = r"""
import json, socket, sys, time
mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def connect():
    for _ in range(100):
        try:
            return socket.create_connection((address, port), timeout=10)
        except OSError:
            time.sleep(0.1)
    raise SystemExit("no connection")

if mode in ("echo", "sink"):
    server = socket.create_server((address, port))
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            total = 0
            while data := conn.recv(1 << 16):
                total += len(data)
                if mode == "echo":
                    conn.sendall(data)
            if mode == "sink":
                conn.sendall(str(total).encode())
elif mode == "udp":
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((address, port))
    print("ready", flush=True)
    sock.settimeout(20)
    seen = []
    try:
        while True:
            seen.append(int(sock.recv(64)))
            sock.settimeout(1)
    except TimeoutError:
        pass
    print(json.dumps(seen))
elif mode == "rtt":
    conn = connect()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(int(sys.argv[4])):
        start = time.monotonic()
        conn.sendall(b"x")
        conn.recv(1)
        rtts.append((time.monotonic() - start) * 1000)
    print(json.dumps(rtts))
elif mode == "bulk":
    conn = connect()
    block, left = b"\0" * (1 << 16), int(sys.argv[4])
    start = time.monotonic()
    while left > 0:
        conn.sendall(block[:left])
        left -= len(block)
    conn.shutdown(socket.SHUT_WR)
    received = int(conn.recv(64))
    print(json.dumps({"bytes": received, "seconds": time.monotonic() - start}))
elif mode == "send":
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(int(sys.argv[4])):
        sock.sendto(str(n).encode(), (address, port))
        if n % 20 == 19:
            time.sleep(0.002)  # paced, so no queue on the way overflows
"""


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Direction:
    def __init__(self, name: str, source: int, sink: int, rng: random.Random) -> None:
        self.name, self.source, self.sink, self.rng = name, source, sink, rng
        self.delay = 0.0  # seconds
        self.loss = 0.0  # probability
        self.queue: deque[tuple[float, bytes]] = deque()
        self.counts = {"read": 0, "dropped": 0, "written": 0, "write_errors": 0}

    def receive(self, now: float) -> None:
        for _ in range(256):  # a bounded batch, so the other direction gets its turn
            try:
                frame = os.read(self.source, FRAME)
            except BlockingIOError:
                return
            self.counts["read"] += 1
            if self.loss and self.rng.random() < self.loss:
                self.counts["dropped"] += 1
            else:
                self.queue.append((now + self.delay, frame))

    def send_due(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            frame = self.queue.popleft()[1]
            try:
                os.write(self.sink, frame)
                self.counts["written"] += 1
            except OSError:  # the device is down (a partition) or its queue is full
                self.counts["write_errors"] += 1

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def main(params_path: str, host_tap: str, switch_tap: str) -> None:
    host_fd, switch_fd = open_tap(host_tap), open_tap(switch_tap)
    rng = random.Random()
    to_host = Direction("to_host", switch_fd, host_fd, rng)
    from_host = Direction("from_host", host_fd, switch_fd, rng)
    directions = (to_host, from_host)
    flags = {"stop": False, "reload": False, "stats": False, "serial": 0, "generation": 0}

    def load() -> None:
        with open(params_path) as handle:
            params = json.load(handle)
        if "seed" in params:
            rng.seed(params["seed"])
        flags["generation"] = params.get("generation", 0)
        for direction in directions:
            delay_ms, loss_percent = params.get(direction.name, (0, 0))
            direction.delay, direction.loss = delay_ms / 1000, loss_percent / 100

    def write_stats() -> None:
        flags["serial"] += 1
        stats = {"serial": flags["serial"], "generation": flags["generation"]}
        stats.update({d.name: d.counts for d in directions})
        with open(params_path + ".stats.tmp", "w") as handle:
            json.dump(stats, handle)
        os.replace(params_path + ".stats.tmp", params_path + ".stats")

    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGHUP, lambda *_: flags.update(reload=True))
    signal.signal(signal.SIGUSR1, lambda *_: flags.update(stats=True))
    # a signal wakes the poll at once (else it is retried until its timeout)
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_write)
    poller = select.poll()
    for fd in (host_fd, switch_fd, wake_read):
        poller.register(fd, select.POLLIN)
    load()
    write_stats()
    print("ready", flush=True)
    stats_due = 0.0
    while not flags["stop"]:
        if flags["reload"]:
            flags["reload"] = False
            load()
            flags["stats"] = True  # the new generation acknowledged at once
        now = time.monotonic()
        dues = [d for d in (x.next_due() for x in directions) if d is not None]
        wait = min([0.5, *(due - now for due in dues)])
        ready = poller.poll(max(0, int(wait * 1000 + 0.999)))
        now = time.monotonic()
        for fd, _ in ready:
            if fd == wake_read:
                os.read(wake_read, 512)
            else:
                (to_host if fd == switch_fd else from_host).receive(now)
        for direction in directions:
            direction.send_due(now)
        if now >= stats_due or flags["stats"]:
            flags["stats"] = False
            write_stats()
            stats_due = now + 0.5
    write_stats()


def measure() -> None:
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from netns import Network  # the harness, only for the measurement

    with Network() as net:
        a, b = net.add_host("a"), net.add_host("b")
        net.start(b, sys.executable, "-c", PEER, "sink", b.address, "7002",
                  stdout=subprocess.DEVNULL)  # fmt: skip

        def ping(label: str, count: int) -> None:
            answer = net.run(a, "ping", "-q", "-c", str(count), "-i", "0.05", b.address)
            print(f"{label}: ping -c {count} -i 0.05:", *answer.stdout.strip().splitlines()[-2:])

        def bulk(label: str, size: int) -> None:
            answer = net.run(a, sys.executable, "-c", PEER, "bulk", b.address, "7002", str(size))
            done = json.loads(answer.stdout)
            rate = done["bytes"] / done["seconds"] / 1e6
            print(f"{label}: bulk TCP {size / 1e6:.0f} MB in {done['seconds']:.2f} s, "
                  f"{rate:.1f} MB/s")  # fmt: skip

        ping("plain veths", 50)
        bulk("plain veths", 50_000_000)
        net.emulate(a)
        net.emulate(b)
        ping("both links through the emulator, 0 ms 0 %", 50)
        bulk("both links through the emulator, 0 ms 0 %", 50_000_000)
        net.impair(a, 20, 1)
        net.impair(b, 20, 1)
        ping("both links 20 ms 1 %", 50)
        ping("both links 20 ms 1 %", 1000)
        before = net.link_stats(b)["to_host"]
        bulk("both links 20 ms 1 %", 10_000_000)
        after = net.link_stats(b)["to_host"]
        read, dropped = (after[k] - before[k] for k in ("read", "dropped"))
        print(f"  frames towards b during that copy: {read} read, {dropped} dropped")
        print("emulator counters:", {h.name: net.link_stats(h) for h in (a, b)})


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        measure()
    else:
        main(*sys.argv[1:4])

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
direction) are written to ``PARAMS.stats`` twice a second and on exit; SIGTERM stops it.

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
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME = 65536


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
    flags = {"stop": False, "reload": True}

    def load() -> None:
        with open(params_path) as handle:
            params = json.load(handle)
        if "seed" in params:
            rng.seed(params["seed"])
        for direction in directions:
            delay_ms, loss_percent = params.get(direction.name, (0, 0))
            direction.delay, direction.loss = delay_ms / 1000, loss_percent / 100

    def write_stats() -> None:
        stats = {d.name: d.counts for d in directions}
        with open(params_path + ".stats.tmp", "w") as handle:
            json.dump(stats, handle)
        os.replace(params_path + ".stats.tmp", params_path + ".stats")

    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGHUP, lambda *_: flags.update(reload=True))
    poller = select.poll()
    poller.register(host_fd, select.POLLIN)
    poller.register(switch_fd, select.POLLIN)
    print("ready", flush=True)
    stats_due = 0.0
    while not flags["stop"]:
        if flags["reload"]:
            flags["reload"] = False
            load()
        now = time.monotonic()
        dues = [d for d in (x.next_due() for x in directions) if d is not None]
        wait = min([0.5, *(due - now for due in dues)])
        ready = poller.poll(max(0, int(wait * 1000 + 0.999)))
        now = time.monotonic()
        for fd, _ in ready:
            (to_host if fd == switch_fd else from_host).receive(now)
        for direction in directions:
            direction.send_due(now)
        if now >= stats_due:
            write_stats()
            stats_due = now + 0.5
    write_stats()


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Latency and loss between hosts in network namespaces.

First the link emulator itself (``linkemu.py``, what :meth:`Network.impair` uses where the
kernel has no ``sch_netem``): the delay a TCP round trip sees, the fraction of datagrams lost
against a binomial bound, order kept, and a bulk TCP copy through it. Then issue 22's
scenario: 20 ms latency and 1 % loss between all hosts (node host, two GPU-worker hosts, a
broker host, a database host) under a study stream: every study drafted exactly once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from netns import Host, Network

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


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the namespace tests run as root with iproute2 (as here and in CI)")
    with Network() as net:
        yield net


def _serve(net: Network, host: Host, mode: str, port: int) -> subprocess.Popen:
    proc = net.start(host, sys.executable, "-c", PEER, mode, host.address, str(port),
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _client(net: Network, host: Host, *args: str, timeout: float = 60) -> object:
    answer = net.run(host, sys.executable, "-c", PEER, *args, timeout=timeout)
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


def test_the_emulator_holds_frames_for_each_directions_delay(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    _serve(network, b, "echo", 7000)
    plain = sorted(_client(network, a, "rtt", b.address, "7000", "20"))  # type: ignore[arg-type]
    # a → b crosses a's link outwards (5 ms) and b's inwards (20 ms); b → a: 0 ms and 10 ms
    network.emulate(a, to_host=(10, 0), from_host=(5, 0))
    network.emulate(b, to_host=(20, 0))
    rtts = sorted(_client(network, a, "rtt", b.address, "7000", "30"))  # type: ignore[arg-type]
    median = rtts[len(rtts) // 2]
    print(f"TCP echo RTT: plain median {plain[10]:.2f} ms; emulated 35 ms: min {rtts[0]:.1f}, "
          f"median {median:.1f}, max {rtts[-1]:.1f} ms")  # fmt: skip
    assert rtts[0] >= 35
    assert median < 35 + 15, "the emulator adds no more than its delay (on a loaded machine)"


def test_the_emulator_drops_its_fraction_and_keeps_order(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    network.emulate(b, to_host=(5, 10))
    receiver = _serve(network, b, "udp", 7001)
    sent = 3000
    sender = network.run(
        a, sys.executable, "-c", PEER, "send", b.address, "7001", str(sent), timeout=60
    )
    assert sender.returncode == 0, sender.stderr
    out, _ = receiver.communicate(timeout=60)
    seen = json.loads(out)
    assert seen == sorted(seen), "frames keep their order within a direction"
    lost = sent - len(seen)
    # binomial(3000, 0.1): mean 300, sd 16.4; five sd either side
    bound = 5 * math.sqrt(sent * 0.1 * 0.9)
    stats = network.link_stats(b)
    print(f"UDP through 10 % loss: {sent} sent, {lost} lost ({100 * lost / sent:.1f} %), "
          f"emulator counters {stats}")  # fmt: skip
    assert abs(lost - sent * 0.1) <= bound, lost


def test_a_bulk_copy_through_the_emulator(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    _serve(network, b, "sink", 7002)
    size = 50 * 1000 * 1000
    plain = _client(network, a, "bulk", b.address, "7002", str(size))
    network.emulate(a)
    network.emulate(b)
    emulated = _client(network, a, "bulk", b.address, "7002", str(size))
    assert plain["bytes"] == emulated["bytes"] == size  # type: ignore[index]
    rates = [size / r["seconds"] / 1e6 for r in (plain, emulated)]  # type: ignore[index]
    print(f"bulk TCP 50 MB: veths {rates[0]:.0f} MB/s; through two emulators (0 ms, 0 %) "
          f"{rates[1]:.1f} MB/s")  # fmt: skip
    assert rates[1] > 5, "the emulator is no bottleneck for studies of a few MB"

"""Latency and loss between hosts in network namespaces.

First the link emulator itself (``linkemu.py``, what :meth:`Network.impair` uses where the
kernel has no ``sch_netem``): the delay a TCP round trip sees, the fraction of datagrams lost
against a binomial bound, order kept, and a bulk TCP copy through it. Then issue 22's
scenario: 20 ms latency and 1 % loss between all hosts (node host, two GPU-worker hosts, a
broker host, a database host, and a PACS host that sends the studies and receives the
outputs) under a study stream: every study drafted exactly once, every output delivered
exactly once.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from linkemu import PEER
from netns import Host, Network, NsStream
from nshosts import CHECK, HA, WORKERS, postgres_host
from services import BIN, node_env, wait_for


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


def test_partition_and_heal_still_work_on_an_emulated_link(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    network.emulate(b, to_host=(10, 0))
    _serve(network, b, "echo", 7003)
    probe = "import socket, sys; socket.create_connection((sys.argv[1], 7003), timeout=2)"

    def reaches() -> bool:
        return network.run(a, sys.executable, "-c", probe, b.address).returncode == 0

    assert reaches()
    network.partition(b)
    assert not reaches(), "the TAP on the switch taken down: frames vanish"
    network.heal(b)
    assert reaches()


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


OUTPUTS = f"""
import json, sys
sys.path[:0] = [{str(HA)!r}, {str(HA.parent)!r}]
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1])
with engine.connect() as conn:
    rows = conn.execute(text(
        "SELECT s.study_instance_uid, o.sop_instance_uid, o.state, o.attempts FROM outputs o "
        "JOIN jobs j ON j.id = o.job_id JOIN studies s ON s.id = j.study_id"
    )).all()
print(json.dumps([list(r) for r in rows]))
"""


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_20_ms_and_1_percent_loss_between_all_hosts_every_study_drafted_once(
    network: Network, tiny_model: Path, tmp_path: Path
) -> None:
    names = ("broker", "db", "node", "gpu1", "gpu2", "pacs")
    hosts = {name: network.add_host(name) for name in names}
    broker, db, node_host, pacs = hosts["broker"], hosts["db"], hosts["node"], hosts["pacs"]
    for host in hosts.values():  # every one-way path between two hosts: 20 ms, 1 % loss
        network.impair(host, 20, 1)
    started = time.monotonic()
    logs: dict[str, Path] = {}

    def start(host: Host, name: str, environment: dict[str, str], *args: str) -> None:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as log:
            network.start(host, str(BIN / "cxrnode"), *args, env=environment, stdout=log,
                          stderr=subprocess.STDOUT)  # fmt: skip

    def in_node(script: str, *args: str) -> object:
        answer = network.run(node_host, sys.executable, "-c", script, *args, timeout=60)
        assert answer.returncode == 0, answer.stderr
        return json.loads(answer.stdout)

    network.start(
        broker,
        shutil.which("redis-server") or "/usr/bin/redis-server",
        "--bind", broker.address, "--port", "6379", "--save", "", "--appendonly", "no",
        "--protected-mode", "no",
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    common = {
        "model": str(tiny_model),
        "broker_url": f"redis://{broker.address}:6379/0",
        "temperature": "0",
        "max_new_tokens": "8",
        "reconcile_interval": "5",
    }
    # the GPU hosts load their models while the database host starts PostgreSQL
    for name in ("gpu1", "gpu2"):
        start(hosts[name], name, node_env(tmp_path / name, **common), "worker", "--queues",
              "infer", "--concurrency", "2")  # fmt: skip
    received = tmp_path / "pacs"
    received.mkdir()
    network.start(pacs, "/usr/bin/storescp", "-aet", "PACS", "-uf", "-od", str(received),
                  "11112", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    database_url = postgres_host(network, db)
    data = tmp_path / "node"
    data.mkdir()
    env = node_env(
        data, database_url=database_url, destinations=f"PACS@{pacs.address}:11112", **common
    )
    port = int(env["CXRNODE_DICOM_PORT"])
    start(node_host, "serve", env, "serve", "--no-workers")
    start(node_host, "node-worker", env, "worker", "--queues", "prepare,outputs,send")

    def loaded() -> bool:
        workers = in_node(WORKERS, broker.address)
        infer = [w for w in workers if "infer" in w["queues"]]  # type: ignore[union-attr]
        return len(workers) == 3 and sum(w["state"].get("model") == "loaded" for w in infer) == 2  # type: ignore[arg-type,union-attr]

    wait_for(loaded, 120, "three workers over the impaired links, two models loaded", interval=1)
    wait_for(
        lambda: network.run(
            node_host, "/usr/bin/echoscu", "-aec", "CXRNODE", "127.0.0.1", str(port)
        ).returncode == 0,
        60,
        "the node in its namespace",
        interval=0.5,
    )  # fmt: skip
    ready = time.monotonic()

    count = 10
    # the studies come from the PACS host, so they too cross two impaired links
    stream = NsStream(network, pacs, port, tmp_path / "studies", count=count, every=0.5,
                      address=node_host.address)  # fmt: skip
    stream.thread.start()
    stream.thread.join(120)
    assert not stream.thread.is_alive()

    def all_delivered() -> tuple[dict, list] | None:
        found = in_node(CHECK, database_url)
        outputs = in_node(OUTPUTS, database_url)
        if not set(found["done"]) >= set(stream.studies):  # type: ignore[index]
            return None
        per_study = {study: [o for o in outputs if o[0] == study] for study in stream.studies}  # type: ignore[union-attr]
        if not all(rows and all(o[2] == "delivered" for o in rows) for rows in per_study.values()):
            return None
        return found, outputs  # type: ignore[return-value]

    found, outputs = wait_for(all_delivered, 90, "every study drafted and delivered", interval=2)
    finished = time.monotonic()
    arrived = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in received.iterdir()
    ]  # fmt: skip
    sent_outputs = [o[1] for o in outputs if o[0] in stream.studies]
    drafted = sum(found["done"].get(s) == 1 for s in stream.studies)
    duplicated = sum(max(0, found["inferred"].get(s, 0) - 1) for s in stream.studies)
    dropped = {  # by the userspace emulator (none where tc netem did the impairing)
        name: sum(network.link_stats(host)[d]["dropped"] for d in ("to_host", "from_host"))
        for name, host in hosts.items()
        if name in network.emulators
    }
    print(
        f"20 ms + 1 % loss between all hosts: {len(stream.studies)} studies sent "
        f"({stream.refused} C-STOREs repeated), {drafted} drafted once, {duplicated} "
        f"duplicated, {count - drafted} lost; {len(sent_outputs)} outputs, {len(arrived)} "
        f"arrived at the PACS ({len(set(arrived))} distinct; send attempts "
        f"{sum(o[3] for o in outputs)}); setup {ready - started:.0f} s, stream to last "
        f"delivery {finished - ready:.0f} s; frames dropped per host link {dropped}"
    )
    assert len(stream.studies) == len(set(stream.studies)) == count
    assert set(stream.acknowledged) <= set(found["rows"]), "an acknowledged instance lost its row"
    for study in stream.studies:
        counts = (found["jobs"][study], found["done"][study], found["inferred"][study])
        assert counts == (1, 1, 1), (study, counts)
    assert sorted(arrived) == sorted(sent_outputs), "every output delivered once, none lost"
    assert all(dropped.values()), "every emulated link lost frames: the impairment was there"

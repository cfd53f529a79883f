"""Real hosts: a broker host, a node host and two GPU-worker hosts in their own network
namespaces; one GPU host is partitioned for 60 s while it holds studies.

Its heartbeat stops reaching the broker, so the node's reconciler sends its studies again and
the other GPU host drafts them before the link returns. When it returns, whatever the
partitioned worker still delivers is refused by the job state machine (the result is already
recorded; with the link down, its publish may also fail outright): every study is drafted
exactly once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import Host, Network, NsStream
from nshosts import CHECK, WORKERS
from services import BIN, node_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_a_gpu_host_partitioned_mid_batch_has_its_studies_drafted_once_by_the_other(
    network: Network, tiny_model: Path, tmp_path: Path
) -> None:
    broker, node_host = network.add_host("broker"), network.add_host("node")
    gpu1, gpu2 = network.add_host("gpu1"), network.add_host("gpu2")
    network.start(
        broker,
        shutil.which("redis-server") or "/usr/bin/redis-server",
        "--bind", broker.address, "--port", "6379", "--save", "", "--appendonly", "no",
        "--protected-mode", "no",
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    data = tmp_path / "node"
    data.mkdir()
    common = {
        "model": str(tiny_model),
        "broker_url": f"redis://{broker.address}:6379/0",
        "temperature": "0",
        "max_new_tokens": "8",
        "reconcile_interval": "5",
    }
    env = node_env(data, **common)
    port = int(env["CXRNODE_DICOM_PORT"])
    logs: dict[str, Path] = {}

    def start(host: Host, name: str, environment: dict[str, str], *args: str) -> None:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as log:
            network.start(
                host,
                str(BIN / "cxrnode"),
                *args,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def in_node(script: str, *args: str) -> object:
        answer = network.run(node_host, sys.executable, "-c", script, *args, timeout=60)
        assert answer.returncode == 0, answer.stderr
        return json.loads(answer.stdout)

    wait_for(
        lambda: (
            network.run(node_host, "redis-cli", "-h", broker.address, "ping").stdout.strip()
            == "PONG"
        ),
        30,
        "the broker host",
        interval=0.3,
    )
    start(node_host, "serve", env, "serve", "--no-workers")
    start(node_host, "node-worker", env, "worker", "--queues", "prepare,outputs,send")
    for host in (gpu1, gpu2):
        gpu_env = node_env(tmp_path / host.name, **common)
        start(host, host.name, gpu_env, "worker", "--queues", "infer", "--concurrency", "4")

    def loaded() -> bool:
        workers = in_node(WORKERS, broker.address)
        infer = [w for w in workers if "infer" in w["queues"]]  # type: ignore[union-attr]
        return len(workers) == 3 and sum(w["state"].get("model") == "loaded" for w in infer) == 2  # type: ignore[arg-type,union-attr]

    wait_for(loaded, 240, "three workers, two models loaded", interval=1.0)
    wait_for(
        lambda: (
            network.run(
                node_host, "/usr/bin/echoscu", "-aec", "CXRNODE", "127.0.0.1", str(port)
            ).returncode
            == 0
        ),
        120,
        "the node in its namespace",
        interval=0.5,
    )

    stream = NsStream(network, node_host, port, tmp_path / "studies", count=10, every=0.5)
    stream.thread.start()

    def gpu1_pids() -> set[int]:
        pids = subprocess.run(
            ["ip", "netns", "pids", gpu1.namespace], capture_output=True, text=True
        ).stdout.split()
        return {int(p) for p in pids}

    def gpu1_holds() -> bool:
        workers = in_node(WORKERS, broker.address)
        mine = gpu1_pids()
        return any(w["held"] and w["pid"] in mine for w in workers)  # type: ignore[index,union-attr]

    wait_for(gpu1_holds, 180, "the first GPU host holding studies", interval=0.2)
    network.partition(gpu1)
    cut = time.monotonic()
    database = f"sqlite:///{data / 'cxrnode.db'}"

    def all_drafted() -> dict | None:
        if stream.thread.is_alive():
            return None
        found = in_node(CHECK, database)
        return found if set(found["done"]) >= set(stream.studies) else None  # type: ignore[index]

    # within the partition: the heartbeat expires (30 s), the reconciler re-sends, gpu2 drafts
    wait_for(all_drafted, 60, "every study drafted while the GPU host is cut off", interval=2.0)
    drafted_after = time.monotonic() - cut
    time.sleep(max(0.0, 60 - drafted_after))
    network.heal(gpu1)
    time.sleep(10)  # room for the partitioned worker's late results to arrive and be refused
    found = in_node(CHECK, database)
    assert len(stream.studies) == 10
    for study in stream.studies:
        counts = (found["jobs"][study], found["done"][study], found["inferred"][study])  # type: ignore[index]
        assert counts == (1, 1, 1), (study, counts)
    node_log = logs["node-worker"].read_text()
    refused = node_log.count("already recorded, or superseded")
    drafted_by = {name: logs[name].read_text().count("succeeded") for name in ("gpu1", "gpu2")}
    print(
        f"GPU host partitioned 60 s: 10 sent, 10 drafted once, 0 lost, all drafted "
        f"{drafted_after:.0f} s after the cut (before the link returned); late results "
        f"refused {refused}; infer tasks finished per host {drafted_by}"
    )

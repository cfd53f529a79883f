"""Real hosts: the node and its PostgreSQL in separate network namespaces, the database host
partitioned for 30 s under a study stream.

The listener answers what it must during the partition (0xA700, out of resources, after at
most the database timeouts; never 0x0000 for an instance without its committed row), the
sender repeats those, and when the link returns the node recovers by itself: every
acknowledged instance has its row and every study is drafted exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import Network, NsStream
from nshosts import CHECK, postgres_host
from services import BIN, node_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_the_database_host_partitioned_for_30_s_loses_no_acknowledged_instance_and_recovers(
    network: Network, tiny_model: Path, tmp_path: Path
) -> None:
    node_host, db_host = network.add_host("node"), network.add_host("db")
    database_url = postgres_host(network, db_host)
    data = tmp_path / "node"
    data.mkdir()
    env = node_env(
        data,
        model=str(tiny_model),
        database_url=database_url,
        temperature="0",
        max_new_tokens="8",
        reconcile_interval="5",
    )
    port = int(env["CXRNODE_DICOM_PORT"])
    log_path = data / "serve.log"
    with open(log_path, "wb") as log:
        serve = network.start(
            node_host, str(BIN / "cxrnode"), "serve", env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def node_answers() -> bool:
        assert serve.poll() is None, log_path.read_text()[-4000:]
        echo = network.run(node_host, "/usr/bin/echoscu", "-aec", "CXRNODE", "127.0.0.1", str(port))
        return echo.returncode == 0

    wait_for(node_answers, 120, "the node in its namespace", interval=0.5)

    stream = NsStream(network, node_host, port, tmp_path / "studies", count=8)
    stream.thread.start()
    wait_for(lambda: len(stream.acknowledged) >= 3, 120, "the first studies", interval=0.5)
    network.partition(db_host)
    cut = time.monotonic()
    time.sleep(30)
    network.heal(db_host)
    healed = time.monotonic()
    stream.thread.join(600)
    assert not stream.thread.is_alive()

    def check() -> dict:
        answer = network.run(node_host, sys.executable, "-c", CHECK, database_url, timeout=60)
        assert answer.returncode == 0, answer.stderr
        return json.loads(answer.stdout)

    def all_drafted() -> dict | None:
        found = check()
        return found if set(found["done"]) >= set(stream.studies) else None

    found = wait_for(all_drafted, 300, "every study drafted after the partition", interval=2.0)
    recovered = time.monotonic() - healed
    assert len(stream.acknowledged) == 8
    assert set(stream.acknowledged) <= set(found["rows"]), "an acknowledged instance lost its row"
    for study in stream.studies:
        assert (found["jobs"][study], found["done"][study], found["inferred"][study]) == (1, 1, 1)
    print(
        f"database partition 30 s: 8 sent, {stream.refused} C-STOREs refused and repeated, "
        f"8 drafted once, 0 lost; last draft {recovered:.0f} s after the link returned "
        f"({time.monotonic() - cut:.0f} s after the cut)"
    )
    assert serve.poll() is None, "the node stayed up through the partition"

"""Broker failover with Redis Sentinel: a master, a replica and three Sentinels as real
processes; the master is killed and the replica promoted.

`BROKER_URL=sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379` with
`BROKER_SENTINEL_MASTER` (Celery's own form) serves Celery's transport and the node's own
Redis clients (wake-ups, heartbeats, tracking keys); both follow the new master. The node
test ends with Ctrl-C to the node's whole process group: it stops without a traceback (its
children used to die of the SIGINT with a KeyboardInterrupt traceback).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis_ha import MASTER_NAME, SentinelSet
from services import Node, wait_for
from stream import Stream, drafts

from cxrnode.jobs.broker import celery_app, redis_client, sentinel_addresses
from cxrnode.settings import Settings


def test_sentinel_urls_are_parsed_as_celery_writes_them(tmp_path: Path) -> None:
    url = "sentinel://:s%40cret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://h3/2"
    assert sentinel_addresses(url) == (
        [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("h3", 26379)],
        None,
        "s@cret",
        2,
    )
    with pytest.raises(ValueError, match="not sentinel://host:port"):
        sentinel_addresses("sentinel://h1:26379;redis://h2:6379")
    unnamed = Settings(data_dir=tmp_path, broker_url="sentinel://h1:26379")
    with pytest.raises(ValueError, match="CXRNODE_BROKER_SENTINEL_MASTER is not set"):
        redis_client(unnamed)
    named = unnamed.model_copy(update={"broker_sentinel_master": "cxr"})
    assert celery_app(named).conf.broker_transport_options["master_name"] == "cxr"


@pytest.mark.slow
@pytest.mark.redis
def test_the_nodes_redis_client_follows_a_failover(tmp_path: Path) -> None:
    redis_set = SentinelSet(tmp_path / "redis").start()
    try:
        settings = Settings(
            data_dir=tmp_path / "data",
            broker_url=redis_set.url,
            broker_sentinel_master=MASTER_NAME,
        )
        client = redis_client(settings, timeout=2)
        client.set("before", "1")
        assert client.connection_pool.get_master_address()[1] == redis_set.master_port
        wait_for(lambda: redis_set.replica_has("before"), 10, "the write replicated")

        redis_set.kill_master()
        redis_set.wait_promoted()

        def writes() -> bool:
            try:
                return bool(client.set("after", "1"))
            except Exception:
                return False

        wait_for(writes, 30, "the client to write to the new master", interval=0.5)
        assert client.get("before") == b"1"
        assert client.connection_pool.get_master_address()[1] == redis_set.replica_port
    finally:
        redis_set.stop()


def test_killing_the_broker_master_under_load_loses_and_repeats_no_draft(
    make_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    redis_set = SentinelSet(tmp_path / "redis").start()
    try:
        node = make_node(
            model=str(tiny_model),
            broker_url=redis_set.url,
            broker_sentinel_master=MASTER_NAME,
            temperature="0",
            max_new_tokens="8",
            reconcile_interval="5",
        )
        stream = Stream(node, tmp_path / "studies", count=12, every=1.0).start()
        wait_for(lambda: len(stream.sent) >= 4, 120, "the first studies", interval=0.5)
        killed = time.monotonic()
        redis_set.kill_master()
        redis_set.wait_promoted()
        stream.join(300)
        database = f"sqlite:///{node.data_dir / 'cxrnode.db'}"

        def all_drafted() -> bool:
            return drafts(database).done.keys() >= set(stream.sent)

        wait_for(all_drafted, 240, "every study drafted after the failover", interval=1.0)
        recovered = time.monotonic() - killed
        result = drafts(database)
        assert len(stream.sent) == 12
        assert result.once(stream.sent), result
        print(f"sentinel failover: 12 sent, 12 drafted once, recovered in {recovered:.0f} s")

        # Ctrl-C in the terminal (SIGINT to the whole process group) stops it cleanly too
        assert "Traceback" not in node.log(), node.log()[-6000:]  # the failover: one-line logs
        assert node.proc is not None
        before = len(node.log())
        os.killpg(node.proc.pid, signal.SIGINT)
        assert node.proc.wait(90) == 0, node.log()[-4000:]
        after = node.log()[before:]
        assert "Traceback" not in after and "cxrnode stopped" in after, after[-6000:]
    finally:
        redis_set.stop()

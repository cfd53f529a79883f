"""The admin web app against a node that really processed studies.

One `cxrnode serve` for all of tests/web (start-up is the slow part), with the tiny
checkpoint, the embedded broker and SQLite, an API token, and one destination: a dcmtk
``storescp`` "PACS" that is down while the first study is sent (its outputs become dead
letters after one try) and up for the rest. A test that consumes dead letters makes its own
(:meth:`Site.fresh_dead_letters`), so the tests do not depend on each other's order.

Every study carries the same invented patient (:data:`PATIENT_NAME`, :data:`PATIENT_ID`,
:data:`BIRTH_DATE`) so tests can search metrics and logs for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import Node, node_env, port_open, wait_for
from webnode import (
    ARTIFACTS,
    FAST,
    Pacs,
    Site,
    all_dead,
    chest,
    delivered,
    study_uid,
    unreadable_chest,
)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("web-site")
    pacs = Pacs(tmp / "pacs")
    data_dir = tmp / "node"
    env = node_env(data_dir, model=str(tiny_model), destinations=pacs.destination, **FAST)
    node = Node(data_dir, env)
    node.start()
    base = f"http://127.0.0.1:{env['CXRNODE_HTTP_PORT']}"
    site = Site(node, pacs, base, "", [], "", "", tmp)
    try:
        wait_for(lambda: port_open(int(env["CXRNODE_HTTP_PORT"])), 60, "the web app")
        # the PACS is down: this draft's outputs become dead letters
        down = chest(tmp, "dead", seed=1)
        site.send(down)
        site.dead = study_uid(down)
        site.wait_study(site.dead, all_dead, "dead letters")
        pacs.start()
        good = [chest(tmp, f"good{i}", seed=10 + i) for i in range(3)]
        bad = unreadable_chest(tmp, "unreadable", seed=20)
        lateral = chest(tmp, "lateral", seed=21, view="LATERAL")
        site.send(*good, lateral)
        site.send(bad, extra=("-xr",))  # propose RLE: the file's own transfer syntax
        site.delivered = [study_uid(p) for p in good]
        site.failed, site.skipped = study_uid(bad), study_uid(lateral)
        for uid in site.delivered:
            site.wait_study(uid, delivered, f"delivery of {uid}")
        site.wait_study(site.failed, lambda d: d["state"] == "failed", "the failure")
        site.wait_study(site.skipped, lambda d: d["state"] == "skipped", "the skip")
        yield site
    finally:
        node.stop()
        pacs.stop()
        (ARTIFACTS / "logs").mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "logs" / f"serve-{int(time.time())}.log").write_text(node.log())

"""Database failover: a PostgreSQL primary with a synchronous streaming replica, both made by
the test; the primary is killed and the replica promoted.

The node's DATABASE_URL is a libpq multi-host URL with ``target_session_attrs=read-write``:
each new connection goes to whichever host accepts writes, and the engine's pre-ping drops
connections to the dead one, so the node reconnects by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pg_ha import PgPair
from services import Node, wait_for
from stream import Stream, drafts

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_killing_the_database_primary_under_load_loses_and_repeats_no_draft(
    make_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    pair = PgPair().start()
    try:
        node = make_node(
            model=str(tiny_model),
            database_url=pair.url,
            temperature="0",
            max_new_tokens="8",
            reconcile_interval="5",
        )
        stream = Stream(node, tmp_path / "studies", count=8, every=1.0).start()
        wait_for(lambda: len(stream.sent) >= 3, 120, "the first studies", interval=0.5)
        killed = time.monotonic()
        pair.kill_primary()
        time.sleep(2.0)  # the time an operator or a failover manager takes to decide
        pair.promote()
        stream.join(300)

        def all_drafted() -> bool:
            try:
                return drafts(pair.url).done.keys() >= set(stream.sent)
            except Exception:
                return False

        wait_for(all_drafted, 240, "every study drafted after the failover", interval=1.0)
        recovered = time.monotonic() - killed
        result = drafts(pair.url)
        assert len(stream.sent) == 8
        assert result.once(stream.sent), result
        print(
            f"postgres failover: 8 sent ({stream.retries} C-STOREs repeated by the sender), "
            f"8 drafted once, recovered in {recovered:.0f} s"
        )
    finally:
        pair.stop()

"""End-to-end fixtures: a real Orthanc PACS, a tiny model, and `cxrnode serve` nodes wired
to each other the way a site wires them (Orthanc routes CR/DX to the node; the node sends its
outputs back to Orthanc).

A module rather than a conftest so that tests/viewer uses the same fixtures: each conftest
imports them (``from pacs_fixtures import ...``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from orthanc_server import Orthanc
from services import Node

#: Settings of every end-to-end node: greedy decoding (deterministic), short answers, a
#: one-second quiet period and retry delays of 1 s doubling to 4 s.
E2E_SETTINGS = {
    "temperature": "0",
    "max_new_tokens": "12",
    "settle_seconds": "1",
    "send_retry_base_seconds": "1",
    "send_retry_max_seconds": "4",
    "send_max_attempts": "20",
    "send_timeout": "3",
    "reconcile_interval": "2",
}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc not yet started (its ports are chosen); stopped after the test."""
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture
def e2e_node(
    make_node: Callable[..., Node], tiny_model: Path, orthanc: Orthanc
) -> Callable[..., Node]:
    """Factory of nodes with the tiny model whose destination is the test's Orthanc, and
    which Orthanc knows as its modality ``cxrnode``. Not started: call ``.start()``."""

    def factory(**settings: str) -> Node:
        values = dict(E2E_SETTINGS, model=str(tiny_model), destinations=orthanc.destination)
        values.update(settings)
        node = make_node(start=False, **values)
        orthanc.node_port = node.port
        orthanc.node_aet = node.ae_title
        return node

    return factory

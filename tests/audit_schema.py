"""The DICOM audit message schema (PS3.15 A.5.1.1), for checking what the node writes.

``tests/audit/dicom-audit-message.rnc`` holds the schema in RELAX NG compact syntax;
rnc2rng turns it into the XML syntax libxml2 reads (lxml), once per test process.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import rnc2rng
from lxml import etree

SCHEMA = Path(__file__).parent / "audit" / "dicom-audit-message.rnc"


@cache
def _schema() -> etree.RelaxNG:
    rng = rnc2rng.dumps(rnc2rng.load(str(SCHEMA)))
    return etree.RelaxNG(etree.fromstring(rng.encode()))


def schema_errors(message: str) -> list[str]:
    """What the schema finds wrong in one audit message (empty when it is valid)."""
    schema = _schema()
    if schema.validate(etree.fromstring(message.encode())):
        return []
    return [f"{e.line}:{e.column} {e.message}" for e in schema.error_log]


def assert_valid(messages: list[str]) -> None:
    """Every message valid; the failure names each invalid one with the schema's words."""
    bad = {m[:160]: errors for m in messages if (errors := schema_errors(m))}
    assert not bad, bad

"""Fixtures of the triage tests (the receivers live in receivers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for path in (str(_HERE), str(_HERE.parent), str(_HERE.parent / "hl7")):
    if path not in sys.path:
        sys.path.insert(0, path)

from receivers import mailbox, webhook  # noqa: E402, F401

"""Deployment tests share the end-to-end fixtures (Orthanc, the tiny model made by the CLI)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from pacs_fixtures import E2E_SETTINGS, e2e_node, orthanc  # noqa: E402, F401

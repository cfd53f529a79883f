"""Fixtures for the imaging tests.

``tests/dicomgen.py`` is a plain module next to the test packages; put ``tests/`` on
``sys.path`` so ``import dicomgen`` works however pytest was started.
"""

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the generated files of a session (they are reused across tests)."""
    return tmp_path_factory.mktemp("dicomgen")

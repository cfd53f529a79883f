"""One full-width checkpoint per test run: the published widths, 2 decoder layers (~1.9 GB)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fullwidth import LAYERS  # noqa: E402
from services import BIN  # noqa: E402


@pytest.fixture(scope="session")
def fullwidth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written once per run by `cxrnode model make-random DIR --size full --layers 2` (torch
    stays out of pytest) and shared by the pytest-xdist workers; a test must not change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    directory, done = root / "fullwidth-model-shared", root / "fullwidth-model-shared.done"
    with open(root / "fullwidth-model-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            made = subprocess.run(
                [str(BIN / "cxrnode"), "model", "make-random", str(directory)]
                + ["--size", "full", "--layers", str(LAYERS)],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert made.returncode == 0, made.stderr[-3000:]
            assert made.stdout.strip() == str(directory)
            done.touch()
    return directory

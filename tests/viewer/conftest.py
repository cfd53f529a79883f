"""Fixtures of the viewer tests: the e2e PACS and node, OHIF on one origin, headless Chromium.

Screenshots go to the artifacts directory (``CXRNODE_VIEWER_ARTIFACTS``, default
``<tmp>/cxrnode-viewer-artifacts``), outside the source tree; its path is printed at the end
of the test run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT  # noqa: E402
from ohif import ohif_dist  # noqa: E402
from pacs_fixtures import E2E_SETTINGS, e2e_node, orthanc  # noqa: E402, F401

_ARTIFACTS = Path(
    os.environ.get("CXRNODE_VIEWER_ARTIFACTS")
    or Path(tempfile.gettempdir()) / "cxrnode-viewer-artifacts"
)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go (emptied at the start of a session)."""
    shutil.rmtree(_ARTIFACTS, ignore_errors=True)
    _ARTIFACTS.mkdir(parents=True)
    return _ARTIFACTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _ARTIFACTS.is_dir() and any(_ARTIFACTS.iterdir()):
        terminalreporter.write_line(f"viewer screenshots: {_ARTIFACTS}")


@pytest.fixture(scope="session")
def ohif_app() -> Path:
    """OHIF's built app; fails with the install command when the cache lacks it."""
    try:
        return ohif_dist()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator:
    """Debian's Chromium, headless, with a fresh profile (no browser is downloaded)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `scripts/setup --test` installs Debian's chromium")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport=VIEWPORT,
        )
        try:
            yield context
        finally:
            context.close()

"""OHIF in Debian's headless Chromium, driven by Playwright, watched for every kind of error.

No browser is downloaded: Playwright starts ``/usr/bin/chromium`` with a fresh profile. What
counts as an error a radiologist would meet:

- a console message of type ``error``, an uncaught page error, and OHIF's own reports of a
  failure at lower levels (it logs "Route viewer Error Boundary ..." and "Something went
  wrong" at debug level before its red toast, and "Failed to load PDF" as a warning);
- any toast of type ``error``: a script injected before OHIF starts records every toast
  as it appears, since they vanish after a few seconds;
- a request to the PACS that failed (HTTP status 400 or more).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import BrowserContext, ConsoleMessage, Locator, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}

_TOAST_RECORDER = """
window.__toasts = [];
new MutationObserver(() => {
  for (const toast of document.querySelectorAll('[data-sonner-toast]')) {
    if (!toast.dataset.recorded) {
      toast.dataset.recorded = '1';
      window.__toasts.push({type: toast.dataset.type || '', text: toast.innerText});
    }
  }
}).observe(document, {childList: true, subtree: true});
"""
_CRASH_MESSAGES = re.compile(r"Error Boundary|Something went wrong|Failed to load PDF")


def flat(text: str) -> str:
    """Whitespace collapsed: how text compares across line breaks and layout."""
    return " ".join(text.split())


def red_fraction(png: bytes) -> float:
    """Share of pixels in the "AI DRAFT" banner red (the SC's and the PDF's banner)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 170) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    return float(red.mean())


def spread(png: bytes) -> float:
    """Standard deviation of the grey levels: about 0 for a blank (black) viewport."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L")).std())


@dataclass
class OhifPage:
    """One OHIF tab, with everything that went wrong in it recorded."""

    context: BrowserContext
    base_url: str
    artifacts: Path
    page: Page = field(init=False)
    console: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page = self.context.new_page()
        self.page.add_init_script(_TOAST_RECORDER)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" or _CRASH_MESSAGES.search(message.text):
            self.console.append(f"{message.type}: {message.text[:500]}")

    # ----------------------------------------------------------------------- what went wrong
    def toasts(self) -> list[dict[str, str]]:
        return self.page.evaluate("window.__toasts || []")

    def problems(self) -> list[str]:
        """Console errors, crash reports and error toasts seen so far."""
        errors = [f"toast: {t['text']}" for t in self.toasts() if t["type"] == "error"]
        return self.console + errors

    # ------------------------------------------------------------------------ what people do
    def open_study(self, study_uid: str) -> None:
        """Open the study in the viewer and wait for its series to be listed."""
        self.page.goto(f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}")
        self.page.locator('[data-cy="study-browser-thumbnail"]').first.wait_for(timeout=90_000)
        self.page.wait_for_timeout(1_500)  # the first-visit tour appears a moment later
        skip = self.page.get_by_text("Skip all", exact=True)
        if skip.count():
            skip.first.click()

    def thumbnail(self, series_number: int) -> Locator:
        return self.page.locator(f'[data-series="{series_number}"]').first

    def open_series(self, series_number: int) -> Locator:
        """Double-click the series in the study browser (as a reader does); the viewport."""
        self.thumbnail(series_number).dblclick()
        return self.page.locator('[data-cy="viewport-pane"]').first

    def wait_until(self, check, timeout_ms: int = 60_000, what: str = "") -> None:  # noqa: ANN001
        """Poll ``check()`` every half second until it is true."""
        waited = 0
        while not check():
            if waited >= timeout_ms:
                raise AssertionError(f"timed out after {timeout_ms / 1000:.0f}s waiting for {what}")
            self.page.wait_for_timeout(500)
            waited += 500

    def screenshot(self, name: str, element: Locator | None = None) -> bytes:
        """Save a PNG under the artifacts directory and return its bytes."""
        path = self.artifacts / f"{name}.png"
        target = element or self.page
        return target.screenshot(path=str(path))

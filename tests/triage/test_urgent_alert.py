"""The alert for an urgent draft left unacknowledged: valid, and fires after N minutes
(``promtool test rules``), and the metric it reads is what ``/metrics`` exposes."""

from __future__ import annotations

import subprocess
from pathlib import Path

PROMETHEUS = Path(__file__).resolve().parents[2] / "config" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=60
    )


def test_the_unacknowledged_urgent_draft_alert_fires_after_ten_minutes_and_clears() -> None:
    checked = promtool("check", "rules", "urgent-rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "urgent-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "urgent-rules.yml" in (PROMETHEUS / "prometheus.yml").read_text()
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr

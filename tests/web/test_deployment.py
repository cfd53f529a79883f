"""What operators deploy around the web app: the Prometheus rules (checked and unit-tested
with promtool), compose's health check and Flower, and an idle web app that does not tick."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import requests
import yaml
from webnode import Site

from cxrnode.jobs.broker import QUEUES

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "config" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=60
    )


def test_alert_rules_are_valid_and_fire_when_they_should() -> None:
    checked = promtool("check", "rules", "cxrnode-rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "cxrnode-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_rules_alert_on_what_an_admin_acts_on() -> None:
    rules = yaml.safe_load((PROMETHEUS / "cxrnode-rules.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for alert, metric in {
        "CxrnodeBacklogGrowing": "cxrnode:jobs_open",
        "CxrnodeOldestJobTooOld": "cxrnode_oldest_open_job_age_seconds",
        "CxrnodeDeadLetters": 'cxrnode_outputs{state="dead"}',
        "CxrnodeNoWorker": "cxrnode_workers_live",
        "CxrnodeDiskNearReserve": "cxrnode_disk_reserve_bytes",
        "CxrnodeModelNotLoaded": "cxrnode_model_loaded",
        "CxrnodeModelUnavailable": 'model_state="unavailable"',
        "CxrnodeDestinationDown": "cxrnode_destination_up",
    }.items():
        assert metric in alerts[alert], alert


def test_compose_checks_the_node_on_readyz_and_runs_flower_and_valid_queues() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    node = services["node"]
    assert "/readyz" in " ".join(node["healthcheck"]["test"])
    assert node["environment"]["CXRNODE_HTTP_HOST"] == "0.0.0.0", "reachable from the host"
    assert services["flower"]["command"][:2] == ["celery", "--broker=redis://redis:6379/0"]
    assert "flower" in services["flower"]["command"]
    for name, service in services.items():
        command = service.get("command") or []
        if command[:2] == ["cxrnode", "worker"]:
            queues = command[command.index("--queues") + 1].split(",")
            assert set(queues) <= set(QUEUES), f"{name} names unknown queues {queues}"


def context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def test_an_idle_web_app_sleeps(site: Site) -> None:
    """No tick: uvicorn's stock loop alone would wake ten times a second."""
    pid = requests.get(site.base + "/healthz", timeout=10).json()["pid"]
    time.sleep(1)  # let the answer's thread go back to sleep
    before = context_switches(pid)
    time.sleep(5)
    assert context_switches(pid) - before <= 3

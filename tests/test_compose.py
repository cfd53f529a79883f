"""compose.yaml is valid and every service in it is one the suite starts natively."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: compose service -> where the suite starts the same thing natively
NATIVE = {
    "redis": "tests/services.py redis_server (pipeline tests)",
    "postgres": "tests/services.py postgres_server (node and pipeline tests)",
    "orthanc": "tests/e2e (Debian Orthanc)",
    "node": "tests/services.py Node: cxrnode serve",
    "node-worker": "cxrnode worker --queues prepare,outputs,send (started by serve)",
    "gpu-worker": "cxrnode worker --queues infer (started by serve)",
    "flower": "tests/web/test_flower.py: celery flower on a node's broker",
}


def test_compose_file_is_valid_and_names_only_services_the_tests_start() -> None:
    assert shutil.which("docker-compose"), "scripts/setup installs Debian's docker-compose"
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO / "compose.yaml"), "config", "--services"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == set(NATIVE)


def test_compose_commands_are_real_cli_commands() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
        command = service.get("command")
        if not command or command[0] != "cxrnode":
            continue
        help_run = subprocess.run(
            [str(Path(sys.executable).with_name("cxrnode")), *command[1:2], "--help"],
            capture_output=True,
            text=True,
        )
        assert help_run.returncode == 0, f"{name}: {help_run.stderr}"
    assert json.dumps(compose)  # plain data

"""compose.yaml as the tests read it: resolved by Debian's docker-compose, and turned into
native commands (no Docker engine here) with the service names replaced by local addresses.

tests/test_compose.py checks the file; tests/deploy/test_stack.py runs its services' commands.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"

#: compose service -> how the suite starts the same program natively
NATIVE = {
    "redis": "tests/deploy/test_stack.py: redis-server with compose's arguments",
    "postgres": "tests/services.py postgres_server: the stock PostgreSQL server",
    "orthanc": "tests/e2e/orthanc_server.py: Debian's Orthanc on config/orthanc/orthanc.json",
    "node": "tests/deploy/test_stack.py: compose's command (cxrnode serve --no-workers)",
    "worker-cpu": "tests/deploy/test_stack.py: compose's command, without torch",
    "worker-gpu": "tests/deploy/test_stack.py: compose's command with the tiny model",
    "flower": "tests/deploy/test_stack.py: compose's command (celery ... flower)",
}

#: compose's host names, which must not survive the rewrite into native settings
SERVICE_HOSTS = ("redis", "postgres", "orthanc", "node")


def compose_config(*, env_file: bool = True) -> dict[str, Any]:
    """compose.yaml resolved by `docker-compose config` (variables filled in)."""
    binary = shutil.which("docker-compose")
    assert binary, "scripts/setup installs Debian's docker-compose"
    args = [binary, "-f", str(COMPOSE)]
    if env_file:
        args += ["--env-file", str(ENV_EXAMPLE)]
    result = subprocess.run(
        [*args, "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def native_env(environment: dict[str, Any], replacements: dict[str, str]) -> dict[str, str]:
    """A service's environment with each compose address replaced by a local one.

    ``replacements`` maps a variable name to its native value; every other value is kept, and
    none may still name a compose service.
    """
    env = {}
    for name, value in environment.items():
        text = replacements.get(name, str(value))
        for host in SERVICE_HOSTS:
            assert f"@{host}" not in text and f"//{host}:" not in text, (
                f"{name}={text!r} still names the compose service {host!r}: "
                "add it to the test's replacements"
            )
        env[name] = text
    return env


def volumes(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each mount, from either syntax docker-compose prints."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
            continue
        parts = volume.split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        found.append((parts[0], parts[1], "ro" in mode.split(",")))
    return found


def ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host address, published port) of each published port ('' = every address)."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((str(port.get("host_ip", "")), str(port["published"])))
            continue
        parts = str(port).split("/")[0].split(":")
        found.append((parts[0], parts[1]) if len(parts) == 3 else ("", parts[0]))
    return found


#: What the node image leaves out (the `model` and `quant` extras).
MODEL_RUNTIME = ("torch", "transformers", "sentencepiece", "safetensors", "huggingface_hub")


def without_model_runtime(directory: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes the model runtime fail to import as if it
    were not installed: how the node image runs (docker/node.Dockerfile)."""
    for name in (*MODEL_RUNTIME, "torchao"):
        package = directory / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({name!r} + ' is not installed (the node image has no "
            f"model runtime)', name={name!r})\n"
        )
    return directory

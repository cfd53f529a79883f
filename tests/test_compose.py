"""compose.yaml is valid, complete and safe, and every service in it is one the suite starts
natively (there is no Docker engine here: tests/deploy/test_stack.py runs the same commands)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "deploy"))

from stack import COMPOSE, ENV_EXAMPLE, NATIVE, REPO, compose_config, ports, volumes  # noqa: E402

from cxrnode.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


def test_compose_validates_with_and_without_the_env_file_and_names_the_stack(
    compose: dict,
) -> None:
    assert set(compose["services"]) == set(NATIVE)
    assert set(compose_config(env_file=False)["services"]) == set(NATIVE)


def test_the_gpu_worker_reserves_an_nvidia_gpu_and_needs_only_the_broker_and_the_model(
    compose: dict,
) -> None:
    gpu = compose["services"]["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("device_ids") or device.get("count")
    env = gpu["environment"]
    assert set(env) == {"CXRNODE_BROKER_URL", "CXRNODE_MODEL", "CXRNODE_BATCH_SIZE"}
    ((source, target, read_only),) = volumes(gpu)
    assert target == env["CXRNODE_MODEL"] and read_only and source.startswith("/")
    assert "ports" not in gpu and "container_name" not in gpu, "--scale must work"
    for name in ("node", "worker-cpu"):
        env = compose["services"][name]["environment"]
        assert env["CXRNODE_DATABASE_URL_FILE"] == "/run/secrets/database_url"


def test_secrets_come_from_files_and_none_is_in_an_environment(compose: dict) -> None:
    from cxrnode.settings import SECRET_SETTINGS

    assert set(compose["secrets"]) == {"api_token", "database_url", "postgres_password"}
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("/"), "a file, resolved by docker-compose config"
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for setting in SECRET_SETTINGS:
            value = str(env.get(f"CXRNODE_{setting.upper()}", ""))
            assert not value or "@" not in value or setting == "broker_url", (name, setting)
        assert "POSTGRES_PASSWORD" not in env and "CXRNODE_API_TOKEN" not in env, name
        for variable, value in env.items():
            if variable.endswith("_FILE"):
                wanted = value.removeprefix("/run/secrets/")
                given = [
                    s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])
                ]
                assert wanted in given, (name, variable)


def test_health_checks_and_start_order(compose: dict) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", "orthanc", "node", "flower"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    node_check = " ".join(services["node"]["healthcheck"]["test"])
    assert "/readyz" in node_check and "CXRNODE_HTTP_PORT" in node_check
    assert services["node"]["environment"]["CXRNODE_HTTP_HOST"] == "0.0.0.0"
    assert "/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])
    for name in ("node", "worker-cpu", "worker-gpu", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["node"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_state_lives_in_named_volumes_and_redis_keeps_an_append_only_file(
    compose: dict,
) -> None:
    services = compose["services"]
    assert set(compose["volumes"]) == {"redis", "postgres", "orthanc", "data"}

    def mounts(name: str) -> dict[str, str]:
        return {
            target: source
            for source, target, _ in volumes(services[name])
            if not source.startswith("/")
        }

    assert mounts("redis") == {"/data": "redis"}
    assert mounts("postgres") == {"/var/lib/postgresql/data": "postgres"}
    assert mounts("orthanc") == {"/var/lib/orthanc/db": "orthanc"}
    for name in ("node", "worker-cpu"):  # the node-side worker shares DATA_DIR with the node
        assert mounts(name) == {"/data": "data"}
        assert services[name]["environment"]["CXRNODE_DATA_DIR"] == "/data"
    assert services["redis"]["command"][-2:] == ["--appendonly", "yes"]


def test_only_the_pacs_and_dicom_ports_are_open_beyond_this_host(compose: dict) -> None:
    published = {name: ports(service) for name, service in compose["services"].items()}
    assert published["node"] == [("", "11112"), ("127.0.0.1", "8080")]
    assert published["flower"] == [("127.0.0.1", "5555")]
    assert published["redis"] == published["postgres"] == published["worker-gpu"] == []
    assert compose["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"]


def test_every_command_is_a_real_cxrnode_command_and_the_images_run_them_unprivileged(
    compose: dict,
) -> None:
    services = compose["services"]
    assert services["node"]["command"] == ["cxrnode", "serve", "--no-workers"]
    assert services["worker-cpu"]["command"] == [
        "cxrnode",
        "worker",
        "--queues",
        "prepare,outputs,send",
    ]
    assert services["worker-gpu"]["command"] == ["cxrnode", "worker", "--queues", "infer"]
    assert services["flower"]["command"][0] == "celery"
    assert services["orthanc"]["command"] == ["Orthanc", "/etc/orthanc/orthanc.json"]
    cxrnode = str(Path(sys.executable).with_name("cxrnode"))
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] == ["cxrnode"]:
            help_run = subprocess.run(
                [cxrnode, *command[1:2], "--help"], capture_output=True, text=True
            )
            assert help_run.returncode == 0, f"{name}: {help_run.stderr}"
        for source, _, _ in volumes(service):
            if source.startswith(str(REPO)):
                assert Path(source).exists(), f"{name} mounts a missing file"
    for dockerfile, image in (("node", "cxrnode-node"), ("worker", "cxrnode-worker")):
        text = (REPO / "docker" / f"{dockerfile}.Dockerfile").read_text()
        assert "\nUSER cxrnode\n" in text
        cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
        users = [s for s in services.values() if s.get("image") == image]
        assert any(yaml.safe_load(cmd.group(1)) == s["command"] for s in users), dockerfile
    node_image = (REPO / "docker" / "node.Dockerfile").read_text()
    assert 'pip install ".[monitor]"' in node_image, "the node image installs no model runtime"


def test_every_variable_compose_reads_is_in_the_env_example_and_means_something() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert used == set(example), "compose.yaml and .env.example name the same variables"
    compose_only = {"CXRNODE_MODEL_DIR", "CXRNODE_DICOM_PUBLISH", "CXRNODE_HTTP_PUBLISH"}
    compose_only.add("CXRNODE_GPU_DEVICE")
    for name in example:
        if name.startswith("CXRNODE_") and name not in compose_only:
            assert name.removeprefix("CXRNODE_").lower() in Settings.model_fields, name

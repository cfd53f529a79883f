"""compose.yaml's stack, run natively: the commands and environments of its services (read from
the resolved compose file, compose's host names replaced by local addresses), a chest
radiograph sent to the demo PACS, and the draft back in the PACS.

The node, the node-side worker and Flower run without the model runtime (as in the node
image); the inference worker alone has it and needs nothing but the broker and the model.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc_server import Orthanc
from services import BIN, free_port, fresh_database, port_open, storescu, wait_for
from stack import compose_config, native_env, without_model_runtime

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: Test pace (not in compose): short quiet period, greedy short answers, quick retries.
PACE = {
    "CXRNODE_SETTLE_SECONDS": "1",
    "CXRNODE_TEMPERATURE": "0",
    "CXRNODE_MAX_NEW_TOKENS": "12",
    "CXRNODE_RECONCILE_INTERVAL": "2",
    "CXRNODE_SEND_RETRY_BASE_SECONDS": "1",
    "CXRNODE_SEND_RETRY_MAX_SECONDS": "4",
    "CXRNODE_SEND_TIMEOUT": "5",
    "CXRNODE_SCP_PROCESSES": "1",
    "CXRNODE_MIN_FREE_DISK_MB": "64",
}


class Stack:
    """The native processes of one stack; each logs to a file; all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = (self.root / f"{name}.out").open("wb")
        err = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=err, start_new_session=True, cwd=self.root
        )
        self.procs[name] = proc
        return proc

    def out(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{self.out(name)[-1500:]}{self.log(name)[-3000:]}" for name in self.procs
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    yield running
    running.stop()


def _get(url: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_compose_stack_runs_natively_and_a_routed_study_comes_back_with_its_draft(
    stack: Stack,
    tmp_path: Path,
    orthanc: Orthanc,
    tiny_model: Path,
    pg_admin_url: str,
) -> None:
    compose = compose_config()["services"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    base["PATH"] = f"{BIN}:{base.get('PATH', '')}"
    no_torch = str(without_model_runtime(tmp_path / "no-model-runtime"))
    slim = {**base, "PYTHONPATH": no_torch}  # the node image: no model runtime

    # redis: compose's command, on a free port in a temporary directory
    redis_port = free_port()
    redis_command = [*compose["redis"]["command"]]
    assert redis_command[:3] == ["redis-server", "--appendonly", "yes"]
    stack.start(
        "redis",
        [*redis_command, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        base,
    )
    wait_for(lambda: port_open(redis_port), 20, "redis-server")
    broker = f"redis://127.0.0.1:{redis_port}/0"

    database = fresh_database(pg_admin_url)
    database_url = database.__enter__()
    try:
        data_dir = tmp_path / "data"
        dicom_port, http_port, flower_port = free_port(), free_port(), free_port()
        secrets = tmp_path / "secrets"  # what compose mounts under /run/secrets
        secrets.mkdir()
        (secrets / "database_url").write_text(database_url + "\n")
        (secrets / "api_token").write_text("stack-test-token-0123456789\n")
        replacements = {
            "CXRNODE_DATABASE_URL_FILE": str(secrets / "database_url"),
            "CXRNODE_API_TOKEN_FILE": str(secrets / "api_token"),
            "CXRNODE_BROKER_URL": broker,
            "CXRNODE_DATA_DIR": str(data_dir),
            "CXRNODE_DESTINATIONS": orthanc.destination,
            "CXRNODE_MODEL": str(tiny_model),
            "CXRNODE_DICOM_PORT": str(dicom_port),
            "CXRNODE_HTTP_PORT": str(http_port),
            "CXRNODE_HTTP_HOST": "127.0.0.1",
        }

        def env_of(service: str, runtime: dict[str, str]) -> dict[str, str]:
            return {
                **runtime,
                **native_env(compose[service]["environment"], replacements),
                **PACE,
            }

        orthanc.node_port, orthanc.node_aet = (
            dicom_port,
            compose["node"]["environment"]["CXRNODE_AE_TITLE"],
        )
        orthanc.start()
        stack.start("node", compose["node"]["command"], env_of("node", slim))
        stack.start("worker-cpu", compose["worker-cpu"]["command"], env_of("worker-cpu", slim))
        stack.start("worker-gpu", compose["worker-gpu"]["command"], env_of("worker-gpu", base))
        flower = [
            part.replace("redis://redis:6379/0", broker).replace("=5555", f"={flower_port}")
            for part in compose["flower"]["command"]
        ]
        stack.start(
            "flower",
            [*flower, "--address=127.0.0.1"],
            {**slim, **{k: str(v) for k, v in compose["flower"]["environment"].items()}},
        )

        summary = wait_for(
            lambda: "try it" in stack.out("node") and stack.out("node"), 120, "the summary"
        )
        assert f":{dicom_port}" in summary and "CXRNODE" in summary
        assert "distributed: database postgresql+psycopg://" in summary
        assert f"broker redis://127.0.0.1:{redis_port}/0" in summary
        assert "none here (--no-workers)" in summary
        assert re.search(rf"model +{re.escape(str(tiny_model))} \(config.json", summary)

        # a modality sends a chest radiograph to the PACS, which routes it to the node
        chest = tmp_path / "chest.dcm"
        subprocess.run(
            [str(BIN / "cxrnode"), "demo", str(chest)], env=slim, check=True, capture_output=True
        )
        sent = storescu(orthanc.dicom_port, chest, called=orthanc.aet)
        assert sent.returncode == 0, sent.stderr
        import pydicom

        study = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)

        def draft_in_pacs() -> bool:
            classes = {i["Tags"].get("SOPClassUID") for i in orthanc.instances_of_study(study)}
            return {SR_CLASS, SC_CLASS} <= classes

        try:
            wait_for(draft_in_pacs, 300, "the draft in the PACS", interval=1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}\n{orthanc.log()[-3000:]}") from None

        status = subprocess.run(
            [str(BIN / "cxrnode"), "status", "--json"],
            env=env_of("node", slim),
            capture_output=True,
            text=True,
            timeout=60,
        )
        report = json.loads(status.stdout)
        assert report["outputs"]["delivered"] == 2
        workers = {",".join(sorted(w["queues"])): w for w in report["workers"]}
        assert set(workers) == {"outputs,prepare,send", "infer"}
        assert re.fullmatch(r"[0-9a-f]{64}", workers["infer"]["model_hash"])
        model_hash = workers["infer"]["model_hash"]
        try:
            wait_for(
                lambda: re.search(
                    rf"model ready: .*, hash {model_hash}, on cpu", stack.log("node")
                ),
                40,
                "the node to say which model the inference worker loaded",
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{stack.log('node')[-4000:]}") from None

        # Flower watches the same Redis, behind its password
        assert _get(f"http://127.0.0.1:{flower_port}/healthcheck") == (200, "OK")
        auth = compose["flower"]["environment"]["FLOWER_BASIC_AUTH"]
        assert _get(f"http://127.0.0.1:{flower_port}/workers")[0] == 401
        assert _get(f"http://127.0.0.1:{flower_port}/workers", auth)[0] == 200

        # the node's health check: the admin web app's /readyz (once the web app is there)
        if port_open(http_port):
            assert _get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200

        for name in ("node", "worker-cpu", "flower"):
            assert "ModuleNotFoundError" not in stack.log(name), stack.log(name)[-3000:]
        assert "superuser privileges" not in stack.log("worker-cpu")
    finally:
        stack.stop()
        database.__exit__(None, None, None)
    assert stack.procs["node"].returncode == 0, "the node stops cleanly on SIGTERM"

"""The first minutes of a newcomer: `scripts/serve` on a fresh data directory prints a short
summary, and the README's example (a chest radiograph from `cxrnode demo`, sent with dcmtk)
is received; the node has no model yet, so the job waits for one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from services import BIN, REPO, free_port, storescu, wait_for

pytestmark = pytest.mark.slow


def test_scripts_serve_on_a_fresh_data_dir_prints_the_summary_and_the_readme_example_works(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "fresh" / "cxrnode"  # does not exist yet
    dicom_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env.update(
        CXRNODE_DATA_DIR=str(data_dir),
        CXRNODE_DICOM_PORT=str(dicom_port),
        CXRNODE_HTTP_PORT=str(http_port),
        CXRNODE_SETTLE_SECONDS="1",
        CXRNODE_SCP_PROCESSES="1",
        CXRNODE_MIN_FREE_DISK_MB="64",
    )
    out, err = tmp_path / "serve.out", tmp_path / "serve.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(REPO / "scripts" / "serve")],
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            cwd=tmp_path,
        )
    try:
        summary = wait_for(
            lambda: "try it" in out.read_text() and out.read_text(),
            300,  # scripts/setup first: quick when .venv already holds what serve needs
            f"the start-up summary\n{err.read_text()[-3000:]}",
            interval=0.5,
        )
        lines = summary.splitlines()
        assert len(lines) <= 14, "one screen"
        assert "CXRNODE" in lines[1] and lines[1].split()[:2] == ["AE", "title"]
        assert f"0.0.0.0:{dicom_port}" in summary
        assert f"data dir   {data_dir}" in summary
        assert "embedded: SQLite cxrnode.db and a redis-server" in summary
        assert "model      not set: images are stored, jobs wait in waiting_model" in summary
        assert f"http://127.0.0.1:{http_port}/" in summary
        assert ("running as root" in summary) == (os.geteuid() == 0)

        # the README's example, as printed there
        chest = tmp_path / "chest.dcm"
        made = subprocess.run(
            [str(BIN / "cxrnode"), "demo", str(chest)], env=env, capture_output=True, text=True
        )
        assert made.returncode == 0 and "synthetic CR chest PA" in made.stdout
        sent = storescu(dicom_port, chest)
        assert sent.returncode == 0, sent.stderr

        def status() -> dict:
            answer = subprocess.run(
                [str(BIN / "cxrnode"), "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            return json.loads(answer.stdout)

        assert status()["instances"]["stored"] == 1
        wait_for(
            lambda: status()["jobs"]["waiting_model"] == 1,
            180,
            f"the job to wait for a model\n{err.read_text()[-3000:]}",
            interval=1,
        )
        log = err.read_text()
        assert "superuser privileges" not in log, "Celery's root warning is replaced"
        assert "Traceback" not in log, log[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err.read_text()[-3000:]

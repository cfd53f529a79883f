"""A worker's exit status tells its supervisor (systemd, compose, `serve`) what happened.

Celery logs "Unrecoverable error" and stops when something outside its reconnect logic breaks
(kombu's Redis transport did, with an AttributeError, after Redis was killed). Such a worker
must exit non-zero, and a stop that was asked for must exit 0. The failure is injected as a
real exception in a consumer bootstep of a real worker on a real Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis as redis_lib
from services import redis_server, wait_for

ROOT = Path(__file__).resolve().parents[2]

BROKEN_WORKER = """
import sys
from celery import bootsteps
from worker.app import app, run_worker

class BrokenTransport(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, parent):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

app.steps["consumer"].add(BrokenTransport)
sys.exit(run_worker(["send"], 1))
"""


def _env(url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env.update(CXRNODE_BROKER_URL=url + "/0", CXRNODE_DATA_DIR=str(tmp_path / "data"))
    return env


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(tmp_path: Path) -> None:
    with redis_server() as url:
        done = subprocess.run(
            [sys.executable, "-c", BROKEN_WORKER],
            env=_env(url, tmp_path),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "Unrecoverable error" in done.stderr + done.stdout, done.stderr[-3000:]
    assert done.returncode == 1, done.stderr[-3000:]


def test_a_worker_asked_to_stop_exits_zero(tmp_path: Path) -> None:
    with redis_server() as url:
        client = redis_lib.Redis.from_url(url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--queues", "send", "--concurrency", "1"],
            env=_env(url, tmp_path),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: client.keys("cxrnode:worker:*"), 90, "the worker's heartbeat", 0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

"""Flower (compose's `flower` service) started natively on a node's broker: it sees the
workers' task events."""

from __future__ import annotations

import subprocess

import requests
from services import BIN, free_port, port_open, wait_for
from webnode import Site

from cxrnode.jobs.broker import broker_url
from cxrnode.settings import Settings


def test_flower_sees_the_pipeline_tasks_from_their_events(site: Site) -> None:
    broker = broker_url(Settings(data_dir=site.node.data_dir))
    port = free_port()
    flower = subprocess.Popen(
        [
            str(BIN / "celery"),
            f"--broker={broker}",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: port_open(port) or flower.poll() is not None, 60, "flower")
        assert flower.poll() is None, flower.stderr.read().decode() if flower.stderr else ""

        def metrics() -> str:
            return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

        # listening is not yet receiving: a worker's heartbeat event (every 10 s) shows it is
        wait_for(lambda: "flower_worker_online{" in metrics(), 60, "flower to hear a worker")
        answer = site.api("POST", f"/api/v1/studies/{site.delivered[2]}/rerun")
        assert answer.status_code == 202

        def seen() -> bool:
            text = metrics()
            return all(
                f'task="cxrnode.{task}",type="task-succeeded"' in text
                for task in ("prepare_image", "infer_report", "record_result", "send_outputs")
            )

        wait_for(seen, 60, "flower to count the tasks' events", interval=1)
    finally:
        flower.terminate()
        flower.wait(20)

"""The queue and workers end to end: a study sent with dcmtk ends as a stored report.

Real `cxrnode serve` processes with real Celery workers, the tiny checkpoint, the embedded
broker (a redis-server child of `serve` on a unix socket, SQLite) or Redis + PostgreSQL.
Failures are real too: SIGKILL of the inference worker, FLUSHALL of Redis, a model that is
missing at start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import dicomgen
import pydicom
import pytest
import redis
from services import storescu, wait_for
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cxrnode.db import Job
from cxrnode.jobs.messages import host_queue
from model.labeler import FINDINGS

FAST = dict(temperature="0", max_new_tokens="8", settle_seconds="1", reconcile_interval="1")


def jobs_of(database_url: str) -> list[Job]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(Job).order_by(Job.id)).all())
    finally:
        engine.dispose()


def send_studies(node, tmp_path: Path, count: int) -> list[str]:
    files = [
        dicomgen.make_chest(tmp_path / f"study{i}.dcm", seed=i, patient_age=f"{30 + i:03}Y")
        for i in range(count)
    ]
    result = storescu(node.port, *files)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files]


def wait_done(database_url: str, count: int, timeout: float = 120) -> list[Job]:
    def finished() -> list[Job]:
        jobs = jobs_of(database_url)
        return jobs if len(jobs) == count and all(j.state == "done" for j in jobs) else []

    return wait_for(finished, timeout, f"{count} jobs to be done", interval=0.5)


def infer_workers(node) -> list[dict]:
    """The node's live inference workers, from their heartbeats (``cxrnode status``): each
    names its pid. (Not ``pgrep``: a worker's process title replaces its command line.)"""
    workers = json.loads(node.cli("status", "--json").stdout)["workers"] or []
    return [w for w in workers if "infer" in w["queues"]]


@pytest.fixture(params=["embedded", "redis+postgresql"])
def mode(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings of one deployment mode; the database URL is under key database_url."""
    if request.param == "embedded":
        return {"database_url": f"sqlite:///{tmp_path / 'node0' / 'cxrnode.db'}"}
    from services import fresh_database

    admin = request.getfixturevalue("pg_admin_url")
    broker = request.getfixturevalue("redis_url")
    redis.Redis.from_url(broker).flushall()
    context = fresh_database(admin)
    url = context.__enter__()
    request.addfinalizer(lambda: context.__exit__(None, None, None))
    return {"database_url": url, "broker_url": broker + "/0"}


def test_a_study_ends_with_a_report_and_findings_stored(
    make_node, mode: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    node = make_node(model=str(tiny_model), **FAST, **mode)
    (study,) = send_studies(node, tmp_path, 1)
    (job,) = wait_done(mode["database_url"], 1)
    assert job.state == "done" and job.error is None
    result = job.model_result
    assert isinstance(result.report, str) and isinstance(result.differential, str)
    assert set(result.findings) == set(FINDINGS)
    assert set(result.findings.values()) <= {"present", "absent", "uncertain", "not_mentioned"}
    assert len(result.model_hash) == 64 and result.timings["total"] > 0
    assert result.worker and result.batch_size == 1
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["jobs"]["done"] == 1
    assert set(status["queues"]) == {"prepare", "infer", "outputs", "send"}
    queues = {q for worker in status["workers"] for q in worker["queues"]}
    assert queues == {"prepare", "infer", "outputs", "send"}, "both workers heartbeat"
    assert [w["model"] for w in status["workers"] if "infer" in w["queues"]] == ["loaded"]


def test_eight_studies_arriving_together_decode_together(
    make_node, tiny_model: Path, tmp_path: Path
) -> None:
    node = make_node(model=str(tiny_model), batch_size="8", **FAST)
    send_studies(node, tmp_path, 8)
    jobs = wait_done(f"sqlite:///{node.data_dir / 'cxrnode.db'}", 8, timeout=180)
    batches = {job.model_result.batch_id for job in jobs}
    assert len(batches) < 8
    assert max(job.model_result.batch_size for job in jobs) > 1


def test_a_node_started_without_a_model_keeps_jobs_waiting_until_one_appears(
    make_node, tiny_model: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model-arrives-later"
    node = make_node(model=str(model_dir), model_retry_seconds="2", **FAST)
    send_studies(node, tmp_path, 2)
    database = f"sqlite:///{node.data_dir / 'cxrnode.db'}"

    def waiting() -> list[Job]:
        jobs = jobs_of(database)
        return jobs if len(jobs) == 2 and all(j.state == "waiting_model" for j in jobs) else []

    jobs = wait_for(waiting, 60, "jobs to wait for the model")
    assert "model cannot be loaded" in jobs[0].error
    shutil.copytree(tiny_model, model_dir)
    done = wait_done(database, 2, timeout=120)
    assert all(job.error is None for job in done)


def test_a_worker_killed_during_inference_still_completes_the_job_once(
    make_node, tiny_model: Path, tmp_path: Path
) -> None:
    # Long answers keep the study in the model for seconds: the kill lands while the infer
    # task is in flight (received, not acknowledged). The default deadline (30 min) stays:
    # the lost work must be found from the dead worker's missing heartbeat.
    node = make_node(model=str(tiny_model), **{**FAST, "max_new_tokens": "512"})
    database = f"sqlite:///{node.data_dir / 'cxrnode.db'}"
    wait_for(lambda: infer_workers(node), 60, "the inference worker")
    send_studies(node, tmp_path, 1)

    def infer_worker_holding_the_job() -> int | None:
        return next((w["pid"] for w in infer_workers(node) if w["jobs"] == 1), None)

    pid = wait_for(
        infer_worker_holding_the_job, 60, "the inference worker to take the job", interval=0.2
    )
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    (job,) = wait_done(database, 1, timeout=300)
    # found from the missing heartbeat (about a minute on a quiet machine; bench/soak.py
    # measures it), not at the 30-minute deadline
    assert time.monotonic() - killed < 300
    assert job.attempts == 1, "the reconciler re-sent the lost work once"
    assert len(jobs_of(database)) == 1
    assert "message was lost" in node.log()


def test_flushall_mid_flight_is_healed_by_the_reconciler(
    make_node, tiny_model: Path, tmp_path: Path, pg_admin_url: str, redis_url: str
) -> None:
    from services import fresh_database

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with fresh_database(pg_admin_url) as database:
        # No workers yet: the three prepare messages wait in Redis when it is flushed.
        node = make_node(
            "--no-workers",
            model=str(tiny_model),
            database_url=database,
            broker_url=redis_url + "/0",
            **FAST,
        )
        send_studies(node, tmp_path, 3)
        wait_for(
            lambda: len([j for j in jobs_of(database) if j.state == "queued"]) == 3,
            60,
            "jobs to be queued",
        )
        queue = host_queue("prepare", socket.gethostname())  # this node host's (NODE_HOST)
        wait_for(lambda: client.llen(queue) == 3, 10, "the messages published after the commit")
        client.flushall()  # every queued message and the waiting marks are gone
        worker = subprocess.Popen(
            [str(node.env["PATH"].split(":")[0] + "/cxrnode"), "worker"],
            env=node.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            jobs = wait_done(database, 3, timeout=150)
        finally:
            worker.terminate()
            worker.wait(30)
        assert [job.attempts for job in jobs] == [1, 1, 1], "each lost message re-sent once"
        node.stop()


def test_gpus_option_runs_one_inference_process_per_gpu(
    make_node, tiny_model: Path, tmp_path: Path
) -> None:
    node = make_node("--no-workers", model=str(tiny_model), **FAST)
    cxrnode = str(Path(node.env["PATH"].split(":")[0]) / "cxrnode")
    workers = [
        subprocess.Popen([cxrnode, "worker", "--queues", queues, *extra], env=node.env)
        for queues, extra in (("infer", ["--gpus", "0,1"]), ("prepare,outputs,send", []))
    ]
    try:
        send_studies(node, tmp_path, 2)
        wait_done(f"sqlite:///{node.data_dir / 'cxrnode.db'}", 2, timeout=180)

        def inference_workers() -> list[dict]:
            listed = json.loads(node.cli("status", "--json").stdout)["workers"] or []
            return [w for w in listed if w["queues"] == ["infer"]]

        gpus = wait_for(
            lambda: sorted(w.get("gpu") or "" for w in inference_workers()) == ["0", "1"] or None,
            120,
            "two inference workers, one per GPU",
        )
        assert gpus
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(60)
    assert wait_for(lambda: inference_workers() == [], 40, "the per-GPU workers to stop")

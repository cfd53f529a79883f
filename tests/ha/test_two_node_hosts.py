"""Two active node hosts: two `cxrnode serve` processes, each with its own DATA_DIR, DICOM and
web ports and NODE_HOST, sharing one PostgreSQL database and one Redis (loopback).

A PACS may send to either. Each study gets one job (grouping is by Study Instance UID in the
shared database); the steps that need its files (prepare, outputs, send) run on the node host
that holds them (a queue per node host); the singletons (settling, reconciling, retention)
run on the holder of the lease and move to the survivor when that host is killed.

The layout is the distributed one: on each node host `serve --no-workers` and a node-side
worker, and one inference worker (a "GPU host") that needs only the broker. Killing a host
kills its node and its worker (kill -9 of both process groups). On one machine the dead
processes' database sessions close at once, so the lease moves in well under a second; a
host cut off without closing them loses it after the server's keepalives (about 25 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dicomgen
import pydicom
import pytest
import redis as redis_lib
from services import (
    BIN,
    Node,
    fresh_database,
    node_env,
    storescu,
    wait_for,
)
from sqlalchemy import select
from stream import drafts
from webnode import Pacs

from cxrnode.db import (
    Instance,
    Job,
    JobState,
    Output,
    OutputState,
    Study,
    make_engine,
    make_sessionmaker,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

#: What the lease holder logs when it takes the singletons (cxrnode.jobs.lease).
TAKES_LEASE = "now runs the singletons"


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    with fresh_database(pg_admin_url) as url:
        yield url


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[str]:
    """A dcmtk storescp as the destination PACS; yields its DESTINATIONS entry."""
    peer = Pacs(tmp_path / "pacs")
    peer.start()
    try:
        yield peer.destination
    finally:
        peer.stop()


class Processes:
    """`cxrnode worker` processes, each in its own process group; all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.root / f"worker-{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [str(BIN / "cxrnode"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop()


def send(node: Node, image: Path) -> str:
    """C-STORE one image to ``node`` (acknowledged); return its Study Instance UID."""
    answer = storescu(node.port, image, timeout=60)
    assert "Received Store Response (Success)" in answer.stderr + answer.stdout, answer.stderr
    return str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)


def where(url: str, study: str) -> dict[str, object]:
    """For one study: the host of each instance, of each job, and its outputs' states."""
    engine = make_engine(url, read_only=True)
    try:
        with make_sessionmaker(engine)() as session:
            instances = session.scalars(
                select(Instance.node_host).where(Instance.study_instance_uid == study)
            ).all()
            jobs = session.execute(
                select(Job.node_host, Job.state)
                .join(Study, Job.study_id == Study.id)
                .where(Study.study_instance_uid == study)
            ).all()
            outputs = session.execute(
                select(Output.path, Output.state)
                .join(Job, Output.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .where(Study.study_instance_uid == study)
            ).all()
            session.rollback()
    finally:
        engine.dispose()
    return {"instances": sorted(instances), "jobs": jobs, "outputs": outputs}


def test_two_active_node_hosts_draft_each_study_once_on_the_host_holding_its_files(
    make_node: Callable[..., Node],
    tiny_model: Path,
    pg_url: str,
    redis_url: str,
    pacs: str,
    processes: Processes,
    tmp_path: Path,
) -> None:
    broker = redis_url + "/7"
    redis_lib.Redis.from_url(broker).flushdb()
    common = dict(
        model=str(tiny_model),
        database_url=pg_url,
        broker_url=broker,
        destinations=pacs,
        temperature="0",
        max_new_tokens="8",
        settle_seconds="3",
        reconcile_interval="5",
        scp_processes="1",
    )
    started = time.monotonic()
    # the distributed layout: on each node host `serve --no-workers` and a node-side worker;
    # one GPU host (its inference worker needs only the broker)
    hosts = {
        h: make_node("--no-workers", start=False, node_host=h, **common)
        for h in ("node-a", "node-b")
    }
    gpu = node_env(tmp_path / "gpu", node_host="gpu", **common)
    processes.start("gpu", ["worker", "--queues", "infer"], gpu)
    for host, node in hosts.items():  # all at once: the first scheduler pass takes the lease
        node.start(wait=False)
        processes.start(host, ["worker", "--queues", "prepare,outputs,send"], node.env)
    for node in hosts.values():
        node.wait_ready(timeout=240)  # a loaded 2-core machine starts a node slowly
    node_a, node_b = hosts["node-a"], hosts["node-b"]
    images = tmp_path / "images"

    # (a) studies sent to each node host; (b) one study split over both
    by_host = {
        "node-a": [send(node_a, dicomgen.make_chest(images / f"a{i}.dcm", seed=10 + i))
                   for i in range(2)],
        "node-b": [send(node_b, dicomgen.make_chest(images / f"b{i}.dcm", seed=20 + i))
                   for i in range(2)],
    }  # fmt: skip
    split_ap = dicomgen.make_chest(images / "split-ap.dcm", view="AP", seed=30)
    split_uid = str(pydicom.dcmread(split_ap, stop_before_pixels=True).StudyInstanceUID)
    split_pa = dicomgen.make_chest(images / "split-pa.dcm", view="PA", study_uid=split_uid, seed=31)
    send(node_a, split_ap)
    send(node_b, split_pa)  # the frontal image the model reads is on node-b
    studies = [*by_host["node-a"], *by_host["node-b"], split_uid]

    def all_delivered(uids: list[str]) -> bool:
        return all(
            (w := where(pg_url, uid))["outputs"]
            and all(state == OutputState.delivered for _, state in w["outputs"])
            for uid in uids
        )

    wait_for(lambda: all_delivered(studies), 240, "every study drafted and sent", interval=1.0)
    result = drafts(pg_url)
    assert result.once(studies), result
    for host, uids in by_host.items():
        other = next(h for h in hosts if h != host)
        for uid in uids:
            seen = where(pg_url, uid)
            assert seen["instances"] == [host]
            assert [(h, s) for h, s in seen["jobs"]] == [(host, JobState.done)]
            for path, _ in seen["outputs"]:  # built and sent where the study's files are
                assert (hosts[host].data_dir / "outputs" / path).is_file()
                assert not (hosts[other].data_dir / "outputs" / path).exists()
    split = where(pg_url, split_uid)
    assert split["instances"] == ["node-a", "node-b"]
    assert [(h, s) for h, s in split["jobs"]] == [("node-b", JobState.done)]  # one job, one draft
    for path, _ in split["outputs"]:
        assert (node_b.data_dir / "outputs" / path).is_file()
    phase_ab = time.monotonic() - started

    # (c) the lease holder's host dies: the survivor takes the singletons, the stream goes on
    holder_name = wait_for(
        lambda: [h for h, n in hosts.items() if TAKES_LEASE in n.log()], 30, "a lease holder"
    )
    assert len(holder_name) == 1, holder_name  # one holder at a time
    holder = hosts[holder_name[0]]
    survivor = hosts[next(h for h in hosts if h != holder_name[0])]
    # a study the dying host acknowledged but had not drafted: its file is only there
    stranded = send(holder, dicomgen.make_chest(images / "stranded.dcm", seed=50))
    killed = time.monotonic()
    holder.kill9()  # the host's power is cut: its node and its worker
    processes.kill9(holder_name[0])
    wait_for(lambda: TAKES_LEASE in survivor.log(), 60, "the survivor to take the lease")
    took_over = time.monotonic() - killed
    later = [
        send(survivor, dicomgen.make_chest(images / f"c{i}.dcm", seed=40 + i)) for i in range(4)
    ]
    wait_for(lambda: all_delivered(later), 180, "the survivor's studies drafted", interval=1.0)
    last_draft = time.monotonic() - killed
    # the stranded study is settled by the survivor and waits in the dead host's queue
    wait_for(lambda: where(pg_url, stranded)["jobs"], 30, "the stranded study's job")
    assert [h for h, _ in where(pg_url, stranded)["jobs"]] == [holder_name[0]]
    assert not where(pg_url, stranded)["outputs"]

    # the host comes back: what it held is drafted there, once
    holder.start(wait=False)
    processes.start(holder_name[0], ["worker", "--queues", "prepare,outputs,send"], holder.env)
    back = time.monotonic()
    wait_for(lambda: all_delivered([stranded]), 180, "the stranded study drafted", interval=1.0)
    stranded_after = time.monotonic() - back
    result = drafts(pg_url)
    everything = [*studies, *later, stranded]
    duplicated = [
        s for s in everything if result.jobs.get(s, 0) > 1 or result.inferred.get(s, 0) > 1
    ]
    lost = [s for s in everything if result.done.get(s) != 1]
    assert not duplicated and not lost, result
    assert took_over <= 30
    print(
        f"two node hosts: (a)+(b) {len(studies)} studies drafted once, {phase_ab:.0f} s from the "
        f"start of both nodes; (c) {holder_name[0]} (the lease holder) killed, the survivor took "
        f"the singletons {took_over:.1f} s later; {len(later)} studies sent to the survivor, "
        f"{len(later)} drafted (last {last_draft:.0f} s after the kill), {len(duplicated)} "
        f"duplicated, {len(lost)} lost; 1 study acknowledged by the killed host waited for it "
        f"and was drafted {stranded_after:.0f} s after it restarted"
    )

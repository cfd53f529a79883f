"""Two node hosts sharing one database: which host holds each file, where each job's
file-bound steps run, and each host's share of retention (in-process; the processes are in
tests/ha/test_two_node_hosts.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from jobcore import Node
from sqlalchemy import select, update

from cxrnode.db import Instance, Job, Study, StudyState, utcnow
from cxrnode.ingest.receive import Ingest
from cxrnode.jobs.grouping import settle_due_studies
from cxrnode.jobs.messages import (
    STAGE_QUEUES,
    InferReport,
    UnknownSchema,
    base_queue,
    consumed_queues,
    host_queue,
)
from cxrnode.retention import purge_due, purge_left_behind


@pytest.fixture
def other_host(node: Node, tmp_path: Path) -> Node:
    """A second node host: its own NODE_HOST and DATA_DIR, the same database."""
    settings = node.settings.model_copy(
        update={"node_host": "node-b", "data_dir": tmp_path / "data-b"}
    )
    (tmp_path / "sources-b").mkdir()
    return Node(
        settings,
        node.sessions,
        node.readers,
        Ingest(settings, node.sessions),
        tmp_path / "sources-b",
    )


def test_the_file_bound_queues_have_a_copy_per_node_host_and_infer_has_one() -> None:
    assert host_queue("prepare", "node-b") == "prepare.node-b"
    assert host_queue("send", "node-b.example.org") == "send.node-b.example.org"
    assert host_queue("infer", "node-b") == "infer"  # GPU workers need only the broker
    assert host_queue("outputs", None) == "outputs"
    assert base_queue("outputs.node-b.example.org") == "outputs"
    assert STAGE_QUEUES["prepare_image"] == base_queue(host_queue("prepare", "node-b"))


def test_a_node_side_worker_consumes_its_hosts_queues_and_the_plain_ones() -> None:
    assert consumed_queues(["prepare", "outputs", "send"], "node-a") == [
        "prepare",
        "prepare.node-a",
        "outputs",
        "outputs.node-a",
        "send",
        "send.node-a",
    ]
    assert consumed_queues(["infer"], "node-a") == ["infer"]


def test_an_inference_request_names_the_host_its_answer_goes_to() -> None:
    wire = {
        "schema": 2,
        "job_id": 1,
        "version": 1,
        "model_input_b64": "",
        "context": {},
        "params": {},
        "node_host": "node-b",
    }
    with pytest.raises(UnknownSchema):  # a release before the host: refused, re-sent later
        InferReport.from_wire({**wire, "schema": 1})
    assert InferReport.schema == 2 and "node_host" in InferReport.__dataclass_fields__


def test_a_study_split_over_two_node_hosts_gets_one_job_on_the_host_of_its_chosen_image(
    node: Node, other_host: Node
) -> None:
    node.receive(view="AP", study_uid="1.2.826.0.1.3680043.10.543.7", seed=1)
    other_host.receive(view="PA", study_uid="1.2.826.0.1.3680043.10.543.7", seed=2)
    with node.sessions() as session:
        jobs = settle_due_studies(session)
        hosts = session.execute(select(Instance.view, Instance.node_host)).all()
        job = session.get(Job, jobs[0])
        assert job is not None
        chosen = session.get(Instance, job.instance_id)
        assert chosen is not None
        assert len(jobs) == 1  # grouping is by Study Instance UID in the shared database
        assert sorted(hosts) == [("AP", node.settings.node_host), ("PA", "node-b")]
        assert (chosen.view, job.node_host) == ("PA", "node-b")  # the job runs where PA is
        assert (other_host.settings.instances_dir / chosen.path).is_file()
        assert not (node.settings.instances_dir / chosen.path).exists()


def test_each_node_host_removes_its_own_files_of_a_purged_study(
    node: Node, other_host: Node
) -> None:
    uid = "1.2.826.0.1.3680043.10.543.8"
    node.receive(view="LATERAL", study_uid=uid, seed=3)  # nothing to draft: skipped
    other_host.receive(view="LATERAL", study_uid=uid, seed=4)
    with node.sessions() as session:
        settle_due_studies(session)
        session.execute(update(Study).values(last_arrival=utcnow() - timedelta(days=60)))
        session.commit()
        files = {h: p for p, h in session.execute(select(Instance.path, Instance.node_host))}
        assert session.scalar(select(Study.state)) == StudyState.skipped
    mine = node.settings.instances_dir / files[node.settings.node_host]
    theirs = other_host.settings.instances_dir / files["node-b"]
    assert mine.is_file() and theirs.is_file()

    assert purge_due(node.settings, node.sessions).studies == 1  # the lease holder's pass
    assert not mine.exists() and theirs.is_file()  # it cannot reach the other host's disk
    assert purge_left_behind(node.settings, node.sessions).files == 0
    assert purge_left_behind(other_host.settings, other_host.sessions).files == 1
    assert not theirs.exists()
    with node.sessions() as session:
        assert None not in session.scalars(select(Instance.purged_at)).all()

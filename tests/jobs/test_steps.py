"""The pipeline's steps called in-process: a real SQLite database, real files, a real DICOM
peer in this process for the send; no broker and no worker process.

Each step takes a session, the settings and its message, and returns the next messages; what
it returns is exactly what the Celery adapter would publish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from jobcore import Node
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from services import free_port
from sqlalchemy import select

from cxrnode.db import (
    Instance,
    Job,
    JobState,
    Output,
    OutputState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.receive import Ingest
from cxrnode.jobs import steps
from cxrnode.jobs.grouping import settle_due_studies
from cxrnode.jobs.messages import (
    BuildOutputs,
    InferReport,
    KeepDisplay,
    Message,
    PrepareImage,
    RecordProblem,
    RecordResult,
    SendOutputs,
    WakeScheduler,
    accept,
)
from cxrnode.jobs.states import take_pending
from cxrnode.prepare.images import MODEL_INPUT_SIZE, decode_model_input, kept_images
from cxrnode.settings import Settings
from model.contracts import ModelResult


@contextmanager
def dicom_peer(port: int) -> Iterator[list[str]]:
    """A pynetdicom C-STORE SCP in this process on ``port``; yields the SOP Instance UIDs it
    stored."""
    ae = AE(ae_title="PEER")
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    received: list[str] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield received
    finally:
        server.shutdown()


@pytest.fixture
def peer_port() -> int:
    return free_port()


@pytest.fixture
def pipeline(
    make_settings: Callable[..., Settings], tmp_path: Path, peer_port: int
) -> Iterator[Node]:
    """A node's settings, database and ingest, with one DICOM destination."""
    settings = make_settings(destinations=[f"PEER@127.0.0.1:{peer_port}"])
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    (tmp_path / "sources").mkdir()
    yield Node(settings, sessions, sessions, Ingest(settings, sessions), tmp_path / "sources")
    engine.dispose()


def queued_job(node: Node) -> tuple[int, int]:
    """Receive one image, settle its study and queue its job, as the scheduler does."""
    node.receive()
    with node.sessions() as session:
        settle_due_studies(session, now=utcnow() + timedelta(seconds=1))
        (work,) = take_pending(session)
    return work.job_id, work.version


def run(node: Node, message: Message, **kwargs: object) -> list[Message]:
    """Run a step as its task would; return what it published, in order."""
    published: list[Message] = []
    with node.sessions() as session:
        steps.run(session, node.settings, message, lambda *m: published.extend(m), **kwargs)  # type: ignore[arg-type]
    return published


def job_of(node: Node, job_id: int) -> Job:
    with node.sessions() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def outputs_of(node: Node, job_id: int) -> list[Output]:
    with node.sessions() as session:
        rows = list(session.scalars(select(Output).where(Output.job_id == job_id)))
        session.expunge_all()
        return rows


def answer() -> ModelResult:
    return ModelResult(
        report="Findings: The heart is enlarged. Impression: Cardiomegaly.",
        differential="Heart failure.",
        recommendation="",
        findings={"cardiomegaly": "present"},
        model_id="tiny",
        model_hash="ab" * 32,
    )


def inferred_job(node: Node) -> tuple[int, int]:
    job_id, version = queued_job(node)
    run(node, PrepareImage(job_id, version), in_process=(KeepDisplay,))
    assert run(node, RecordResult(job_id, version, answer())) == [BuildOutputs(job_id, version)]
    return job_id, version


# ---------------------------------------------------------------------------------- prepare


def test_prepare_keeps_the_images_moves_the_job_on_and_asks_for_inference(
    pipeline: Node,
) -> None:
    job_id, version = queued_job(pipeline)
    message, keep = run(pipeline, PrepareImage(job_id, version))
    assert isinstance(message, InferReport) and isinstance(keep, KeepDisplay)
    assert run(pipeline, keep) == []  # what the task runs once the request is published
    assert (message.job_id, message.version) == (job_id, version)
    image = decode_model_input(message.model_input_b64)
    assert image.shape == (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE) and image.std() > 0
    assert message.params.max_new_tokens == pipeline.settings.max_new_tokens
    job = job_of(pipeline, job_id)
    assert job.state == JobState.prepared
    with pipeline.sessions() as session:
        instance = session.get(Instance, session.get(Job, job_id).instance_id)
        kept = kept_images(
            pipeline.settings, instance.study_instance_uid, instance.sop_instance_uid
        )
    assert kept.display.exists() and kept.model_input.exists()


def test_prepare_of_an_unreadable_image_fails_the_job_with_the_reason(pipeline: Node) -> None:
    job_id, version = queued_job(pipeline)
    with pipeline.sessions() as session:
        instance = session.get(Instance, session.get(Job, job_id).instance_id)
        path = pipeline.settings.instances_dir / instance.path
    path.write_bytes(b"not DICOM at all")
    assert run(pipeline, PrepareImage(job_id, version)) == []
    job = job_of(pipeline, job_id)
    assert job.state == JobState.failed and job.error.startswith("image cannot be read")


def test_prepare_for_another_version_of_the_job_does_nothing(pipeline: Node) -> None:
    job_id, version = queued_job(pipeline)
    assert run(pipeline, PrepareImage(job_id, version + 1)) == []
    assert job_of(pipeline, job_id).state == JobState.queued


# ----------------------------------------------------------------------------- record, build


def test_a_result_is_recorded_once_and_asks_for_the_outputs(pipeline: Node) -> None:
    job_id, version = queued_job(pipeline)
    run(pipeline, PrepareImage(job_id, version))
    message = RecordResult(job_id, version, answer())
    assert run(pipeline, message) == [BuildOutputs(job_id, version)]
    assert run(pipeline, message) == [], "a redelivered answer is refused by the job's table"
    job = job_of(pipeline, job_id)
    assert job.state == JobState.inferred and job.model_result == answer()


def test_a_problem_reported_by_the_inference_side_is_recorded(pipeline: Node) -> None:
    job_id, version = queued_job(pipeline)
    run(pipeline, PrepareImage(job_id, version))
    problem = RecordProblem(job_id, version, JobState.waiting_model, "no model configured")
    assert run(pipeline, problem) == []
    job = job_of(pipeline, job_id)
    assert job.state == JobState.waiting_model and job.error == "no model configured"


def test_build_writes_the_outputs_claims_their_rows_and_asks_to_send_them(
    pipeline: Node,
) -> None:
    job_id, version = inferred_job(pipeline)
    (message,) = run(pipeline, BuildOutputs(job_id, version))
    rows = outputs_of(pipeline, job_id)
    assert message == SendOutputs(pipeline.settings.destinations[0], tuple(r.id for r in rows))
    assert {r.kind for r in rows} == {"text_sr", "sc"}
    assert all(r.state == OutputState.in_flight for r in rows), "claimed for this message"
    assert all((pipeline.settings.outputs_dir / r.path).stat().st_size > 0 for r in rows)
    assert job_of(pipeline, job_id).state == JobState.done
    assert run(pipeline, BuildOutputs(job_id, version)) == [], "claimed rows are not re-sent"


def test_record_runs_build_in_process_when_asked(pipeline: Node) -> None:
    job_id, version = queued_job(pipeline)
    run(pipeline, PrepareImage(job_id, version))
    (message,) = run(pipeline, RecordResult(job_id, version, answer()), in_process=(BuildOutputs,))
    assert isinstance(message, SendOutputs) and len(message.output_ids) == 2
    assert job_of(pipeline, job_id).state == JobState.done


# -------------------------------------------------------------------------------------- send


def test_send_delivers_the_study_to_the_peer_and_records_each_outcome(
    pipeline: Node, peer_port: int
) -> None:
    job_id, version = inferred_job(pipeline)
    (message,) = run(pipeline, BuildOutputs(job_id, version))
    with dicom_peer(peer_port) as received:
        assert run(pipeline, message) == []
    rows = outputs_of(pipeline, job_id)
    assert sorted(received) == sorted(r.sop_instance_uid for r in rows)
    assert {(r.state, r.attempts, r.last_status) for r in rows} == {
        (OutputState.delivered, 1, "0x0000")
    }
    assert run(pipeline, message) == [], "a redelivered message sends nothing again"


def test_send_to_an_unreachable_destination_schedules_a_retry_and_wakes_the_scheduler(
    pipeline: Node,
) -> None:
    job_id, version = inferred_job(pipeline)
    (message,) = run(pipeline, BuildOutputs(job_id, version))
    assert run(pipeline, message) == [WakeScheduler()]  # nothing listens on the peer port
    rows = outputs_of(pipeline, job_id)
    assert {(r.state, r.attempts, r.last_status) for r in rows} == {
        (OutputState.pending, 1, "no-connection")
    }
    assert run(pipeline, message) == [], "a duplicate message finds nothing in flight"


# ---------------------------------------------------------------------------------- messages


def test_every_message_survives_its_wire_form() -> None:
    messages: list[Message] = [
        PrepareImage(3, 1),
        RecordResult(3, 1, answer()),
        RecordProblem(3, 1, JobState.failed, "inference failed"),
        BuildOutputs(3, 1),
        SendOutputs("PACS@pacs:104", (4, 5)),
    ]
    for message in messages:
        assert type(message).from_wire(message.to_wire()) == message


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (({"schema": 2, "job_id": 3, "version": 1},), "schema 2"),
        ((3, 1), "2 positional"),
        (({"schema": 1, "job_id": 3},), "lacks ['version']"),
        (({"schema": 1, "job_id": "3", "version": 1},), "must be an integer"),
    ],
)
def test_a_message_this_release_cannot_read_is_refused_with_one_log_line(
    caplog: pytest.LogCaptureFixture, args: tuple, why: str
) -> None:
    with caplog.at_level(logging.INFO, logger="cxrnode"):
        assert accept(PrepareImage, args, {}) is None
    (line,) = [r for r in caplog.records if r.name.startswith("cxrnode")]
    assert line.levelno == logging.ERROR
    assert PrepareImage.task in line.getMessage() and why in line.getMessage()

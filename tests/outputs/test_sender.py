"""The outbox: building and recording outputs, claiming them, sending them to real peers
(dcmtk ``storescp``, a pynetdicom SCP), classifying what the peer answered, backoff, dead
letters and resend.

Jobs are inserted as the pipeline leaves them (state ``inferred`` with a model answer in the
``ModelResult.to_dict()`` shape), which tests the outputs and sender layer on its own; the
whole pipeline with a model and Orthanc is in ``tests/e2e``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

_TESTS = Path(__file__).resolve().parents[1]
for _path in (str(_TESTS), str(_TESTS / "e2e")):  # e2e: the Orthanc helper
    if _path not in sys.path:
        sys.path.insert(0, _path)

import dicomgen  # noqa: E402
from orthanc_server import DICOMWEB_PLUGIN, Orthanc  # noqa: E402
from services import free_port, port_open, wait_for  # noqa: E402

from cxrnode.db import (  # noqa: E402
    Instance,
    InstanceState,
    Job,
    JobState,
    Output,
    OutputState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.ingest.storage import instance_relpath  # noqa: E402
from cxrnode.net.requestor import associate  # noqa: E402
from cxrnode.outputs.build import PIPELINE_VERSION, build_outputs  # noqa: E402
from cxrnode.outputs.outbox import (  # noqa: E402
    Destination,
    RetryPolicy,
    Verdict,
    association_outcome,
    due_outputs,
    resend,
    retarget,
    send_batch,
    status_outcome,
)
from cxrnode.settings import Settings  # noqa: E402
from cxrnode.uids import OutputKind, output_uids  # noqa: E402

MODEL_HASH = "ab" * 32
FINDINGS = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "pleural_effusion",
    "pneumothorax",
    "pneumonia",
    "lung_opacity",
    "no_finding",
)


def model_result(**overrides: object) -> dict:
    """A model answer in the ModelResult.to_dict() shape."""
    findings = dict.fromkeys(FINDINGS, "not_mentioned")
    findings.update(cardiomegaly="present", pleural_effusion="present", pneumothorax="absent")
    result = {
        "report": "Findings: The heart is enlarged. Small right pleural effusion. "
        "No pneumothorax. Impression: Cardiomegaly with a small effusion.",
        "differential": "Congestive heart failure.",
        "recommendation": "Follow-up radiograph.",
        "findings": findings,
        "finding_sources": dict.fromkeys(FINDINGS, "report"),
        "prompts": {"report": "default", "differential": "default"},
        "model_id": "/models/tiny-cxr-llava",
        "model_hash": MODEL_HASH,
        "timings": {"encode": 0.1, "prefill": 0.2, "decode": 0.3, "total": 0.6},
    }
    result.update(overrides)
    return result


# ------------------------------------------------------------------------------- fixtures


@dataclass
class Outbox:
    """A node's data directory, database and settings, without the processes."""

    settings: Settings
    sessions: sessionmaker
    tmp: Path
    made: list[Path] = field(default_factory=list)

    def source(self, study_uid: str | None = None, **kwargs: object) -> Path:
        kwargs.setdefault("rows", 64)
        kwargs.setdefault("cols", 64)
        path = self.tmp / f"source{len(self.made)}.dcm"
        self.made.append(path)
        return dicomgen.make_chest(path, study_uid=study_uid or generate_uid(), **kwargs)

    def job(self, source: Path, *, version: int = 1, result: dict | None = None, state=None) -> int:
        """Record a source image, its study and an inferred job, as the pipeline does."""
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        relpath = instance_relpath(ds.StudyInstanceUID, ds.SOPInstanceUID)
        target = self.settings.instances_dir / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        with self.sessions() as session:
            study = session.scalar(
                select(Study).where(Study.study_instance_uid == ds.StudyInstanceUID)
            )
            if study is None:
                study = Study(
                    study_instance_uid=ds.StudyInstanceUID,
                    state=StudyState.settled,
                    settle_at=utcnow(),
                )
                session.add(study)
                session.flush()
            study.version = version
            instance = Instance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                modality=ds.Modality,
                body_part="CHEST",
                view="PA",
                path=relpath,
                size_bytes=target.stat().st_size,
                calling_aet="TEST",
                state=InstanceState.stored,
                study_id=study.id,
            )
            session.add(instance)
            session.flush()
            job = Job(
                study_id=study.id,
                instance_id=instance.id,
                version=version,
                state=state or JobState.inferred,
                result=result if result is not None else model_result(),
            )
            session.add(job)
            session.commit()
            return job.id

    def build(self, job_id: int) -> list[int]:
        with self.sessions() as session:
            return build_outputs(session, self.settings, job_id)

    def rows(self, ids: list[int] | None = None) -> list[Output]:
        with self.sessions() as session:
            query = select(Output).order_by(Output.id)
            if ids is not None:
                query = query.where(Output.id.in_(ids))
            return list(session.scalars(query))

    def mark(self, output_id: int, state: OutputState) -> None:
        with self.sessions() as session:
            session.get(Output, output_id).state = state
            session.commit()

    def claim(self, **kwargs: object) -> list:
        with self.sessions() as session:
            return due_outputs(session, **kwargs)

    def send(self, destination: str, ids: list[int]) -> dict:
        """Claim the due rows among ``ids`` (as the scheduler does), then send them."""
        with self.sessions() as session:
            due_outputs(session, only=ids)
            return send_batch(session, self.settings, destination, ids)

    def with_destinations(self, *destinations: str) -> Outbox:
        settings = self.settings.model_copy(update={"destinations": list(destinations)})
        return Outbox(settings, self.sessions, self.tmp, self.made)

    def with_outputs(self, *kinds: str) -> Outbox:
        settings = Settings(**{**self.settings.model_dump(), "outputs": ",".join(kinds)})
        return Outbox(settings, self.sessions, self.tmp, self.made)


@pytest.fixture
def send_options(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Short retry delays and timeouts, set as a deployment would (environment)."""
    options = {
        "CXRNODE_SEND_RETRY_BASE_SECONDS": "0.2",
        "CXRNODE_SEND_RETRY_MAX_SECONDS": "0.8",
        "CXRNODE_SEND_MAX_ATTEMPTS": "4",
        "CXRNODE_SEND_TIMEOUT": "2",
    }
    for name, value in options.items():
        monkeypatch.setenv(name, value)
    return options


def _outbox(tmp_path: Path, database_url: str, destinations: list[str]) -> Iterator[Outbox]:
    engine = make_engine(database_url)
    upgrade(engine)
    settings = Settings(data_dir=tmp_path / "data", destinations=destinations)
    try:
        yield Outbox(settings, make_sessionmaker(engine), tmp_path)
    finally:
        engine.dispose()


@pytest.fixture
def outbox(tmp_path: Path, send_options: dict[str, str]) -> Iterator[Outbox]:
    """SQLite outbox with one destination (a closed port: nothing listens there)."""
    yield from _outbox(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}", [f"PACS@127.0.0.1:{free_port()}"]
    )


@pytest.fixture
def any_outbox(tmp_path: Path, database_url: str, send_options: dict[str, str]) -> Iterator[Outbox]:
    """The same on SQLite and on PostgreSQL (row locking differs between them)."""
    yield from _outbox(tmp_path, database_url, ["PACS@127.0.0.1:104", "ARCHIVE@127.0.0.1:11113"])


@dataclass
class Peer:
    port: int
    received: list[str] = field(default_factory=list)
    associations: int = 0


@contextmanager
def pynetdicom_peer(
    *,
    ae_title: str = "PEER",
    status: int = 0x0000,
    sop_classes: tuple[str, ...] = (ComprehensiveSRStorage, SecondaryCaptureImageStorage),
    max_associations: int = 10,
) -> Iterator[Peer]:
    """A pynetdicom C-STORE SCP that requires its own called AE title."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = max_associations
    for sop_class in (*sop_classes, Verification):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    peer = Peer(free_port())
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            peer.received.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def on_established(event: evt.Event) -> None:
        with lock:
            peer.associations += 1

    server = ae.start_server(
        ("127.0.0.1", peer.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ESTABLISHED, on_established)],
    )
    try:
        yield peer
    finally:
        server.shutdown()


@contextmanager
def storescp(directory: Path, *extra: str, ae_title: str = "STORESCP") -> Iterator[Peer]:
    """dcmtk storescp writing what it receives into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    peer = Peer(free_port())
    log = directory.parent / f"{directory.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "/usr/bin/storescp",
                "-v",
                "-aet",
                ae_title,
                "-od",
                str(directory),
                *extra,
                str(peer.port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: port_open(peer.port), 10, "storescp to listen")
        yield peer
    finally:
        proc.terminate()
        proc.wait(10)
        text = log.read_text(errors="replace")
        peer.associations = text.count("Association Acknowledged")
        peer.received = [
            str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for path in sorted(directory.iterdir())
        ]


def closed_port() -> int:
    port = free_port()
    assert not port_open(port)
    return port


# -------------------------------------------------------------------------- pure policies


def test_backoff_starts_at_the_base_doubles_and_stops_at_the_cap() -> None:
    policy = RetryPolicy()  # dcm4chee's defaults: 30 s doubling to 10 min, 10 tries
    assert [policy.delay(n) for n in range(1, 9)] == [30, 60, 120, 240, 480, 600, 600, 600]
    assert policy.max_attempts == 10
    assert RetryPolicy(1.0, 4.0, 3).delay(1000) == 4.0


def test_a_retry_policy_that_cannot_work_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="SEND_RETRY_BASE_SECONDS"):
        RetryPolicy(60.0, 30.0, 10)
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(1.0, 2.0, 0)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, Verdict.delivered),
        (0xB000, Verdict.delivered_warning),
        (0xB007, Verdict.delivered_warning),
        (0xB006, Verdict.delivered_warning),
        (0x0001, Verdict.delivered_warning),
        (0xA700, Verdict.retry),
        (0xA900, Verdict.retry),
        (0xC000, Verdict.retry),
        (0x0122, Verdict.dead),
        (0x0124, Verdict.dead),
        (None, Verdict.retry),
    ],
)
def test_c_store_statuses_are_classified_as_the_standard_means_them(
    status: int | None, verdict: Verdict
) -> None:
    assert status_outcome(status).verdict == verdict


def test_destinations_parse_in_all_three_forms_and_bad_ones_say_what_is_expected() -> None:
    plain = Destination.parse("ORTHANC@pacs.local:4242")
    assert (plain.ae_title, plain.host, plain.port, plain.tls) == (
        "ORTHANC",
        "pacs.local",
        4242,
        False,
    )
    secure = Destination.parse("dicom-tls://ORTHANC@pacs.local:2762")
    assert secure.tls and secure.port == 2762
    web = Destination.parse("https://pacs.local/dicom-web/")
    assert web.kind == "stow" and web.url == "https://pacs.local/dicom-web"
    with pytest.raises(ValueError, match="AET@host:port"):
        Destination.parse("ftp://pacs.local")
    with pytest.raises(ValueError, match="AET@host:port"):
        Destination.parse("pacs.local:4242")


def test_a_corrected_ae_title_takes_over_outputs_recorded_for_the_same_address() -> None:
    configured = ["ORTHANC@10.0.0.5:4242", "https://web.example/dicom-web"]
    assert retarget("ORTHANX@10.0.0.5:4242", configured) == "ORTHANC@10.0.0.5:4242"
    assert retarget("ORTHANC@10.0.0.5:4242", configured) == "ORTHANC@10.0.0.5:4242"
    assert retarget("OTHER@10.0.0.6:4242", configured) == "OTHER@10.0.0.6:4242"
    assert retarget("dicom-tls://ORTHANX@10.0.0.5:4242", configured).startswith("dicom-tls")


# ------------------------------------------------------------------ building and recording


def test_outputs_are_written_durably_recorded_per_destination_and_the_job_is_done(
    any_outbox: Outbox,
) -> None:
    source = any_outbox.source()
    job_id = any_outbox.job(source)
    ids = any_outbox.build(job_id)

    rows = any_outbox.rows(ids)
    assert [r.id for r in rows] == ids
    assert [(r.destination, r.kind) for r in rows] == [
        ("PACS@127.0.0.1:104", "text_sr"),
        ("PACS@127.0.0.1:104", "sc"),
        ("ARCHIVE@127.0.0.1:11113", "text_sr"),
        ("ARCHIVE@127.0.0.1:11113", "sc"),
    ]
    assert all(r.state == OutputState.pending and r.attempts == 0 for r in rows)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    for row in rows:
        expected = output_uids(
            study_instance_uid=ds.StudyInstanceUID,
            source_sop_instance_uid=ds.SOPInstanceUID,
            model_hash=MODEL_HASH,
            pipeline_version=PIPELINE_VERSION,
            kind=OutputKind(row.kind),
        )
        assert row.sop_instance_uid == expected.sop_instance_uid
        written = pydicom.dcmread(any_outbox.settings.outputs_dir / row.path)
        assert written.SOPInstanceUID == row.sop_instance_uid
        assert written.StudyInstanceUID == ds.StudyInstanceUID
        assert written.SOPClassUID == row.sop_class_uid
    with any_outbox.sessions() as session:
        assert session.get(Job, job_id).state == JobState.done


def test_building_twice_returns_the_same_rows_and_adds_nothing(any_outbox: Outbox) -> None:
    job_id = any_outbox.job(any_outbox.source())
    first = any_outbox.build(job_id)
    files = sorted(any_outbox.settings.outputs_dir.rglob("*.dcm"))
    before = {path: path.read_bytes() for path in files}
    assert any_outbox.build(job_id) == first
    assert len(any_outbox.rows()) == 4
    assert sorted(any_outbox.settings.outputs_dir.rglob("*.dcm")) == files
    assert {path: path.read_bytes() for path in files} == before


def test_a_new_version_references_the_sr_it_replaces(outbox: Outbox) -> None:
    study = generate_uid()
    first = outbox.job(outbox.source(study))
    first_sr = next(r for r in outbox.rows(outbox.build(first)) if r.kind == "text_sr")
    outbox.mark(first_sr.id, OutputState.delivered)  # it reached the PACS
    second = outbox.job(outbox.source(study), version=2)
    second_sr = next(r for r in outbox.rows(outbox.build(second)) if r.kind == "text_sr")

    assert second_sr.sop_instance_uid != first_sr.sop_instance_uid
    sr = pydicom.dcmread(outbox.settings.outputs_dir / second_sr.path)
    prior = sr.PredecessorDocumentsSequence[0]
    assert prior.StudyInstanceUID == study
    reference = prior.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == first_sr.sop_instance_uid
    assert sr.InstanceNumber == 2


def test_a_new_version_supersedes_the_older_drafts_still_waiting_to_be_sent(
    outbox: Outbox,
) -> None:
    study = generate_uid()
    first = outbox.rows(outbox.build(outbox.job(outbox.source(study))))
    second = outbox.rows(outbox.build(outbox.job(outbox.source(study), version=2)))
    assert {r.state for r in outbox.rows([r.id for r in first])} == {OutputState.superseded}
    assert {r.state for r in second} == {OutputState.pending}
    sr = pydicom.dcmread(
        outbox.settings.outputs_dir / next(r for r in second if r.kind == "text_sr").path
    )
    assert "PredecessorDocumentsSequence" not in sr  # the first never reached a viewer
    assert outbox.send(outbox.settings.destinations[0], [r.id for r in first]) == {}


ALL_KINDS = ("pdf", "sc", "air_sr", "text_sr")  # as a site might list them: any order


def test_every_configured_kind_is_built_and_the_text_report_travels_first(
    outbox: Outbox, tmp_path: Path
) -> None:
    with storescp(tmp_path / "received") as peer:
        box = outbox.with_destinations(f"STORESCP@127.0.0.1:{peer.port}").with_outputs(*ALL_KINDS)
        ids = box.build(box.job(box.source()))
        rows = box.rows(ids)
        assert [r.kind for r in rows] == ["text_sr", "air_sr", "sc", "pdf"]
        assert [r.sop_class_uid for r in rows] == [
            ComprehensiveSRStorage,
            ComprehensiveSRStorage,
            SecondaryCaptureImageStorage,
            "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        ]
        (batch,) = box.claim()
        assert batch.output_ids == ids
        box.send(batch.destination, batch.output_ids)
    assert {r.state for r in box.rows(ids)} == {OutputState.delivered}
    assert peer.associations == 1
    assert sorted(peer.received) == sorted(r.sop_instance_uid for r in rows)


def test_each_sr_kind_names_its_own_predecessor(outbox: Outbox) -> None:
    box = outbox.with_outputs(*ALL_KINDS)
    study = generate_uid()
    first = {r.kind: r for r in box.rows(box.build(box.job(box.source(study))))}
    for row in first.values():
        box.mark(row.id, OutputState.delivered)  # they reached the PACS
    second = {r.kind: r for r in box.rows(box.build(box.job(box.source(study), version=2)))}

    for kind in ("text_sr", "air_sr"):
        sr = pydicom.dcmread(box.settings.outputs_dir / second[kind].path)
        prior = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert prior.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            first[kind].sop_instance_uid
        )
    for kind in ("sc", "pdf"):
        ds = pydicom.dcmread(box.settings.outputs_dir / second[kind].path)
        assert "PredecessorDocumentsSequence" not in ds


def test_a_row_recorded_as_sr_before_the_text_report_existed_is_the_structured_predecessor(
    outbox: Outbox,
) -> None:
    box = outbox.with_outputs("air_sr")
    study = generate_uid()
    (old,) = box.rows(box.build(box.job(box.source(study))))
    with box.sessions() as session:
        session.get(Output, old.id).kind = "sr"  # as the previous release recorded it
        session.get(Output, old.id).state = OutputState.delivered
        session.commit()

    (new,) = box.rows(box.build(box.job(box.source(study), version=2)))

    sr = pydicom.dcmread(box.settings.outputs_dir / new.path)
    prior = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert prior.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.sop_instance_uid


def test_without_destinations_the_files_are_written_and_nothing_is_queued(
    outbox: Outbox,
) -> None:
    quiet = outbox.with_destinations()
    job_id = quiet.job(quiet.source())
    assert quiet.build(job_id) == []
    assert len(list(quiet.settings.outputs_dir.rglob("*.dcm"))) == 2
    assert quiet.rows() == []
    with quiet.sessions() as session:
        assert session.get(Job, job_id).state == JobState.done


def test_a_result_that_breaks_the_contract_fails_the_job_with_the_reason(outbox: Outbox) -> None:
    job_id = outbox.job(outbox.source(), result=model_result(findings={"dragons": "present"}))
    assert outbox.build(job_id) == []
    with outbox.sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.failed
        assert "dragons" in job.error
    assert outbox.rows() == []


def test_only_inferred_jobs_get_outputs(outbox: Outbox) -> None:
    superseded = outbox.job(outbox.source(), state=JobState.superseded)
    assert outbox.build(superseded) == []
    assert outbox.build(12345) == []
    assert outbox.rows() == []


# ---------------------------------------------------------------------------------- claiming


def test_claimed_outputs_are_not_handed_out_again_until_their_lease_ends(
    any_outbox: Outbox,
) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    any_outbox.build(any_outbox.job(any_outbox.source(study_a)))
    any_outbox.build(any_outbox.job(any_outbox.source(study_b)))

    batches = any_outbox.claim(lease_seconds=60)
    assert sorted((b.destination, b.study_uid) for b in batches) == sorted(
        (d, s) for d in any_outbox.settings.destinations for s in (study_a, study_b)
    )
    rows = {r.id: r for r in any_outbox.rows()}
    for batch in batches:
        assert [rows[i].kind for i in batch.output_ids] == ["text_sr", "sc"]  # report first
        assert {rows[i].destination for i in batch.output_ids} == {batch.destination}
    assert all(r.state == OutputState.in_flight for r in rows.values())
    assert any_outbox.claim(lease_seconds=60) == []  # the next scheduler tick
    later = utcnow() + timedelta(seconds=61)
    assert len(any_outbox.claim(now=later, lease_seconds=60)) == 4  # the task was lost


def test_a_claim_can_be_limited_to_the_rows_a_task_just_made(any_outbox: Outbox) -> None:
    mine = any_outbox.build(any_outbox.job(any_outbox.source()))
    other = any_outbox.build(any_outbox.job(any_outbox.source()))
    claimed = [i for batch in any_outbox.claim(only=mine) for i in batch.output_ids]
    assert sorted(claimed) == sorted(mine)
    assert sorted(i for b in any_outbox.claim() for i in b.output_ids) == sorted(other)


# ------------------------------------------------------------------------ sending to peers


def test_a_study_s_sr_and_sc_travel_in_one_association_to_storescp(
    any_outbox: Outbox, tmp_path: Path
) -> None:
    with storescp(tmp_path / "received") as peer:
        box = any_outbox.with_destinations(f"STORESCP@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        outcomes = box.send(box.settings.destinations[0], ids)
    assert [o.verdict for o in outcomes.values()] == [Verdict.delivered, Verdict.delivered]
    rows = box.rows(ids)
    assert sorted(peer.received) == sorted(r.sop_instance_uid for r in rows)
    assert peer.associations == 1
    assert all(r.state == OutputState.delivered and r.attempts == 1 for r in rows)
    assert all(r.last_status == "0x0000" and r.last_error is None for r in rows)
    # what arrived is what was written, and it is a valid object
    for path in (tmp_path / "received").iterdir():
        check = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
        assert not [line for line in check.stderr.splitlines() if line.startswith("Error")]


def test_an_unreachable_destination_is_retried_with_growing_delays_then_dead(
    outbox: Outbox,
) -> None:
    destination = outbox.settings.destinations[0]  # nothing listens there
    ids = outbox.build(outbox.job(outbox.source()))
    delays = []
    for attempt in range(1, 5):  # CXRNODE_SEND_MAX_ATTEMPTS=4
        outcomes = outbox.send(destination, ids)
        assert {o.status for o in outcomes.values()} == {"no-connection"}
        rows = outbox.rows(ids)
        assert {r.attempts for r in rows} == {attempt}
        if attempt < 4:
            assert {r.state for r in rows} == {OutputState.pending}
            assert outbox.send(destination, ids) == {}  # not due yet: the backoff holds
            delays.append({(r.next_try_at - r.updated_at).total_seconds() for r in rows})
            due = rows[0].next_try_at
            wait_for(lambda due=due: utcnow() >= due, 5, "the next try")
    assert delays == [{0.2}, {0.4}, {0.8}]  # base 0.2 s, doubling, cap 0.8 s
    rows = outbox.rows(ids)
    assert {r.state for r in rows} == {OutputState.dead}
    assert all("gave up after 4 tries" in r.last_error for r in rows)
    assert outbox.claim() == []


def test_a_wrong_called_ae_title_is_a_permanent_reject_and_goes_dead_at_once(
    outbox: Outbox,
) -> None:
    with pynetdicom_peer(ae_title="PEER") as peer:
        box = outbox.with_destinations(f"WRONG@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        outcomes = box.send(box.settings.destinations[0], ids)
        assert {o.status for o in outcomes.values()} == {"rejected-permanent"}
        rows = box.rows(ids)
        assert {(r.state, r.attempts) for r in rows} == {(OutputState.dead, 1)}
        assert "called ae title not recognised" in rows[0].last_error.lower()
        assert box.claim() == []  # no retry storm: nothing is due, ever
        assert peer.received == []


def test_storescp_refusing_the_association_is_a_permanent_reject(
    outbox: Outbox, tmp_path: Path
) -> None:
    with storescp(tmp_path / "refusing", "--refuse") as peer:
        box = outbox.with_destinations(f"STORESCP@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        box.send(box.settings.destinations[0], ids)
    assert {(r.state, r.last_status) for r in box.rows(ids)} == {
        (OutputState.dead, "rejected-permanent")
    }


def test_a_fast_rejection_is_never_read_as_a_dead_peer(tmp_path: Path) -> None:
    """storescp --refuse answers A-ASSOCIATE-RJ at once; pynetdicom alone sometimes loses it
    (cxrnode.net.requestor). Many requests at once, each must read as the peer's rejection."""
    outcomes: list[str] = []
    lock = threading.Lock()

    def ask(port: int) -> None:
        for _ in range(6):
            ae = AE(ae_title="CXRNODE")
            ae.add_requested_context(Verification)
            assoc = associate(ae, "127.0.0.1", port, ae_title="STORESCP")
            with lock:
                outcomes.append(association_outcome(assoc, "STORESCP").status)

    with storescp(tmp_path / "refusing", "--refuse") as peer:
        threads = [threading.Thread(target=ask, args=(peer.port,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(outcomes) == 48
    assert set(outcomes) == {"rejected-permanent"}, Counter(outcomes)


def test_a_busy_peer_s_transient_reject_is_retried(outbox: Outbox) -> None:
    with pynetdicom_peer(max_associations=1) as peer:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        held = holder.associate("127.0.0.1", peer.port, ae_title="PEER")
        assert held.is_established
        try:
            box = outbox.with_destinations(f"PEER@127.0.0.1:{peer.port}")
            ids = box.build(box.job(box.source()))
            box.send(box.settings.destinations[0], ids)
            rows = box.rows(ids)
            assert {(r.state, r.last_status, r.attempts) for r in rows} == {
                (OutputState.pending, "rejected-transient", 1)
            }
        finally:
            held.release()
        wait_for(lambda: utcnow() >= rows[0].next_try_at, 5, "the next try")
        box.send(box.settings.destinations[0], ids)
    assert {r.state for r in box.rows(ids)} == {OutputState.delivered}


def test_warning_statuses_count_as_delivered_with_a_warning(outbox: Outbox) -> None:
    with pynetdicom_peer(status=0xB007) as peer:
        box = outbox.with_destinations(f"PEER@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        box.send(box.settings.destinations[0], ids)
    rows = box.rows(ids)
    assert {(r.state, r.last_status) for r in rows} == {(OutputState.delivered_warning, "0xB007")}
    assert len(peer.received) == 2


def test_an_out_of_resources_answer_is_retried_later(outbox: Outbox) -> None:
    with pynetdicom_peer(status=0xA700) as peer:
        box = outbox.with_destinations(f"PEER@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        box.send(box.settings.destinations[0], ids)
    assert len(peer.received) == 2  # the peer saw them and said "not now"
    for row in box.rows(ids):
        assert (row.state, row.last_status, row.attempts) == (OutputState.pending, "0xA700", 1)
        assert (row.next_try_at - row.updated_at).total_seconds() == 0.2  # the base delay
        assert "out of resources" in row.last_error


def test_a_rejected_presentation_context_kills_only_that_object(outbox: Outbox) -> None:
    with pynetdicom_peer(sop_classes=(SecondaryCaptureImageStorage,)) as peer:
        box = outbox.with_destinations(f"PEER@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        box.send(box.settings.destinations[0], ids)
    rows = {r.kind: r for r in box.rows(ids)}
    assert (rows["text_sr"].state, rows["text_sr"].last_status) == (
        OutputState.dead,
        "context-rejected",
    )
    assert "Comprehensive SR" in rows["text_sr"].last_error
    assert rows["sc"].state == OutputState.delivered
    assert peer.received == [rows["sc"].sop_instance_uid]
    assert peer.associations == 1


def test_an_abort_during_the_transfer_is_retried(outbox: Outbox, tmp_path: Path) -> None:
    with storescp(tmp_path / "aborting", "--abort-during") as peer:
        box = outbox.with_destinations(f"STORESCP@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        box.send(box.settings.destinations[0], ids)
    rows = box.rows(ids)
    assert {r.state for r in rows} == {OutputState.pending}
    assert {r.attempts for r in rows} == {1}


def test_a_missing_output_file_is_a_dead_letter_that_says_to_rerun(outbox: Outbox) -> None:
    with pynetdicom_peer() as peer:
        box = outbox.with_destinations(f"PEER@127.0.0.1:{peer.port}")
        ids = box.build(box.job(box.source()))
        sc = next(r for r in box.rows(ids) if r.kind == "sc")
        (box.settings.outputs_dir / sc.path).unlink()
        box.send(box.settings.destinations[0], ids)
    rows = {r.kind: r for r in box.rows(ids)}
    assert rows["text_sr"].state == OutputState.delivered
    assert rows["sc"].state == OutputState.dead and "rerun" in rows["sc"].last_error


# ---------------------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throw-away CA; the server certificate names 127.0.0.1, so hostnames are checked."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=cxrnode test CA", cwd=d,
    )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN=cxrnode-test-{name}", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d,
        )  # fmt: skip
    return d


def test_dicom_tls_destinations_verify_the_peer_and_present_our_certificate(
    outbox: Outbox, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = ("+tls", str(pki / "server.key"), str(pki / "server.crt"), "+cf", str(pki / "ca.crt"))
    with storescp(tmp_path / "tls", *tls) as peer:
        destination = f"dicom-tls://STORESCP@127.0.0.1:{peer.port}"
        box = outbox.with_destinations()
        ids_untrusted = box.with_destinations(destination).build(box.job(box.source()))
        # the system CAs do not know the test CA: the handshake fails, which is retried
        box.send(destination, ids_untrusted)
        assert {r.last_status for r in box.rows(ids_untrusted)} == {"no-connection"}

        monkeypatch.setenv("CXRNODE_SEND_TLS_CA", str(pki / "ca.crt"))
        monkeypatch.setenv("CXRNODE_SEND_TLS_CERT", str(pki / "client.crt"))
        monkeypatch.setenv("CXRNODE_SEND_TLS_KEY", str(pki / "client.key"))
        trusted = box.with_destinations(destination)
        fresh = Settings(data_dir=box.settings.data_dir)  # reads the TLS options
        trusted.settings = fresh.model_copy(update={"destinations": [destination]})
        ids = trusted.build(trusted.job(trusted.source()))
        trusted.send(destination, ids)
    assert {r.state for r in box.rows(ids)} == {OutputState.delivered}
    assert sorted(peer.received) == sorted(r.sop_instance_uid for r in box.rows(ids))


# ---------------------------------------------------------------------------------- DICOMweb


def test_dicomweb_destinations_store_by_stow_rs_and_classify_http_answers(
    outbox: Outbox, tmp_path: Path
) -> None:
    assert DICOMWEB_PLUGIN.is_file(), (
        f"{DICOMWEB_PLUGIN} is missing: install the Debian package orthanc-dicomweb, the "
        "DICOMweb server this test sends to"
    )
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        url = f"{pacs.url}/dicom-web"
        web = outbox.with_destinations(url)
        source = web.source()
        ids = web.build(web.job(source))
        outcomes = web.send(url, ids)
        assert [o.verdict for o in outcomes.values()] == [Verdict.delivered] * 2
        stored = {
            i["Tags"]["SOPInstanceUID"]
            for i in pacs.instances_of_study(
                str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
            )
        }
        assert stored == {r.sop_instance_uid for r in web.rows(ids)}
        assert {(r.state, r.last_status) for r in web.rows(ids)} == {
            (OutputState.delivered, "0x0000")
        }

        wrong = f"{pacs.url}/no-such-dicom-web"  # a client error: retrying cannot help
        bad = outbox.with_destinations(wrong)
        bad_ids = bad.build(bad.job(bad.source()))
        bad.send(wrong, bad_ids)
        assert {(r.state, r.last_status) for r in bad.rows(bad_ids)} == {
            (OutputState.dead, "HTTP 404")
        }
    finally:
        pacs.stop()

    down = outbox.with_destinations(url)  # the server is gone: try again later
    down_ids = down.build(down.job(down.source()))
    down.send(url, down_ids)
    assert {(r.state, r.last_status) for r in down.rows(down_ids)} == {
        (OutputState.pending, "no-connection")
    }


# ------------------------------------------------------------------------------------ resend


def _kill(outbox: Outbox, ids: list[int], destination: str | None = None) -> None:
    with outbox.sessions() as session:
        for output_id in ids:
            row = session.get(Output, output_id)
            row.state = OutputState.dead
            row.attempts = 10
            row.last_error = "gave up"
            if destination:
                row.destination = destination
        session.commit()


def _resend(outbox: Outbox, **selection: object) -> list[int]:
    with outbox.sessions() as session:
        return resend(session, outbox.settings, **selection)


def test_resend_revives_dead_letters_and_a_corrected_ae_title_applies(
    any_outbox: Outbox,
) -> None:
    box = any_outbox.with_destinations("PACS@127.0.0.1:104")
    ids = box.build(box.job(box.source()))
    _kill(box, ids, destination="PACX@127.0.0.1:104")  # sent with a typo, rejected
    assert sorted(_resend(box, dead=True)) == sorted(ids)
    rows = box.rows(ids)
    assert {(r.state, r.attempts, r.destination) for r in rows} == {
        (OutputState.pending, 0, "PACS@127.0.0.1:104")
    }
    assert all(r.next_try_at <= utcnow() for r in rows)
    assert len(box.claim()) == 1


def test_resend_of_a_study_sends_its_current_draft_everywhere_configured(
    any_outbox: Outbox,
) -> None:
    one = any_outbox.with_destinations("PACS@127.0.0.1:104")
    study = generate_uid()
    one.build(one.job(one.source(study)))
    current = one.build(one.job(one.source(study), version=2))
    with one.sessions() as session:
        for row in session.scalars(select(Output)):
            row.state = OutputState.delivered
        session.commit()

    two = one.with_destinations("PACS@127.0.0.1:104", "ARCHIVE@127.0.0.1:11113")
    again = _resend(two, study_uid=study)
    rows = two.rows(again)
    assert {r.id for r in rows if r.destination == "PACS@127.0.0.1:104"} == set(current)
    assert sorted((r.destination, r.kind) for r in rows) == sorted(
        (d, k) for d in two.settings.destinations for k in ("text_sr", "sc")
    )
    assert {r.state for r in rows} == {OutputState.pending}
    with pytest.raises(LookupError, match="no recorded outputs"):
        _resend(two, study_uid=generate_uid())
    with pytest.raises(ValueError, match="exactly one"):
        _resend(two, dead=True, output_id=current[0])


def test_resend_of_one_output_touches_only_that_row(any_outbox: Outbox) -> None:
    ids = any_outbox.build(any_outbox.job(any_outbox.source()))
    _kill(any_outbox, ids)
    assert _resend(any_outbox, output_id=ids[1]) == [ids[1]]
    states = {r.id: r.state for r in any_outbox.rows(ids)}
    assert states.pop(ids[1]) == OutputState.pending
    assert set(states.values()) == {OutputState.dead}
    with pytest.raises(LookupError, match="no output"):
        _resend(any_outbox, output_id=99999)

"""The hostile corpus through the ingest, in-process (all of it, on SQLite and PostgreSQL)
and over the network (a representative subset, against a real node).

Each case gets a DICOM status or a recorded skip; every refusal is a ``refusals`` row;
nothing is written outside the data directory; the node answers the next association; and
no patient data reaches the log.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import corpus
import dicomgen
import pydicom
import pytest
from corpus import Case
from pynetdicom import AE, _config
from services import echoscu, storescu
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from cxrnode.db import Instance, Refusal, make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.receive import SUCCESS, Ingest
from cxrnode.settings import Settings

CASES = corpus.corpus()


def files_under(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, names in os.walk(root) for f in names}


def receive(ingest: Ingest, case: Case, index: int):  # noqa: ANN201
    received = ingest.settings.tmp_dir / f"tmp{index:05}.dcm"
    received.write_bytes(case.part10())
    try:
        return ingest.receive_file(
            received,
            transfer_syntax=case.transfer_syntax,
            sop_class_uid=case.sop_class,
            sop_instance_uid=case.sop_instance,
            calling_aet="HOSTILE",
            peer_host="127.0.0.1",
        )
    finally:
        received.unlink()


@pytest.fixture
def ingest(tmp_path: Path, database_url: str) -> Ingest:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, min_free_disk_mb=1)
    settings.tmp_dir.mkdir(parents=True)
    engine = make_engine(database_url)
    upgrade(engine)
    return Ingest(settings, make_sessionmaker(engine))


def test_every_hostile_case_gets_a_status_or_a_recorded_skip(
    ingest: Ingest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside_before = files_under(tmp_path) - files_under(ingest.settings.data_dir)
    good = dicomgen.make_chest(tmp_path / "good.dcm")
    refused = 0
    caplog.set_level(logging.INFO)
    for index, case in enumerate(CASES):
        outcome = receive(ingest, case, index)
        assert outcome.status in case.expect, (case.name, hex(outcome.status), outcome.reason)
        if outcome.status != SUCCESS:
            refused += 1
            assert outcome.reason, case.name
        elif case.skip_reason:
            with ingest.sessions() as session:
                row = session.get(Instance, outcome.instance_id)
                assert row is not None and row.state == "skipped", case.name
                assert case.skip_reason in row.skip_reason, (case.name, row.skip_reason)
    # the node still takes a good instance, handed over as the listener would
    received = ingest.settings.tmp_dir / "tmpgood.dcm"
    shutil.copyfile(good, received)
    meta = pydicom.dcmread(good, stop_before_pixels=True).file_meta
    assert (
        ingest.receive_file(
            received,
            transfer_syntax=str(meta.TransferSyntaxUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            calling_aet="GOOD",
            peer_host=None,
        ).status
        == SUCCESS
    )

    with ingest.sessions() as session:
        recorded = session.scalar(select(func.count()).select_from(Refusal))
        kinds = set(session.scalars(select(Refusal.kind)))
    assert recorded == refused
    assert kinds <= {"unreadable", "mismatch", "not-supported", "uid-conflict"}
    outside_after = files_under(tmp_path) - files_under(ingest.settings.data_dir)
    assert outside_after - outside_before == {good}, "nothing written outside the data dir"
    for stored in files_under(ingest.settings.data_dir):
        assert ingest.settings.data_dir.resolve() in stored.resolve().parents
    assert not Path("/tmp/cxrnode-escape").exists()
    text = caplog.text
    assert corpus.PATIENT_NAME not in text and corpus.PATIENT_ID not in text


#: Sent over the network: one case of each kind (the in-process run covers them all).
NETWORK_CASES = [
    case
    for case in CASES
    if case.name
    in {
        "truncated-010-value",
        "wrong-length-huge",
        "item-never-closes",
        "sequences-2000-deep",
        "rows-columns-beyond-data",
        "pixel-data-short",
        "bad-uid-dot-dot-slash-StudyInstanceUID",
        "bad-uid-70-chars-SOPInstanceUID",
        "charset-gb18030-garbage",
        "charset-nul-bytes",
        "transfer-syntax-explicit-vr-big-endian",
        "huge-private-element",
        "ct-under-cr-class",
        "garbage",
    }
]


def send_raw(port: int, case: Case, path: Path) -> int:
    """A pynetdicom association that streams the case's bytes as they are."""
    path.write_bytes(case.part10())
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(case.sop_class, [case.transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established, case.name
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_a_representative_subset_over_the_network_and_the_node_keeps_answering(
    make_node, tmp_path: Path
) -> None:
    assert len(NETWORK_CASES) == 14
    node = make_node("--no-workers", log_format="json")
    refused = 0
    for case in NETWORK_CASES:
        status = send_raw(node.port, case, tmp_path / f"{case.name}.dcm")
        assert status in case.expect, (case.name, hex(status))
        refused += status != SUCCESS
        assert echoscu(node.port).returncode == 0, f"no answer after {case.name}"
    good = dicomgen.make_chest(tmp_path / "good.dcm")
    assert storescu(node.port, good).returncode == 0
    engine = create_engine(f"sqlite:///{node.data_dir / 'cxrnode.db'}")
    with Session(engine) as session:
        refusals = session.scalar(select(func.count()).select_from(Refusal))
    engine.dispose()
    assert refusals == refused
    logs = node.log() + "".join(
        p.read_text(errors="replace") for p in (node.data_dir / "logs").glob("*.log")
    )
    assert corpus.PATIENT_NAME not in logs and corpus.PATIENT_ID not in logs
    assert "Traceback" not in logs
    assert not Path("/tmp/cxrnode-escape").exists()

"""The plain functions under the listener, called without a network."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import dicomgen
import pydicom
import pytest
from sqlalchemy import select

from cxrnode.db import Instance, Job, Study, make_engine, make_sessionmaker, utcnow
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.receive import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Ingest
from cxrnode.ingest.storage import instance_relpath, is_valid_uid
from cxrnode.jobs.grouping import settle_due_studies
from cxrnode.settings import Settings


@pytest.fixture
def ingest(tmp_path: Path, database_url: str) -> Ingest:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, min_free_disk_mb=1)
    engine = make_engine(database_url)
    upgrade(engine)
    return Ingest(settings, make_sessionmaker(engine))


def receive(ingest: Ingest, path: Path):
    """Hand the ingest a file as pynetdicom's chunked receive does: a Part-10 copy in
    DATA_DIR/tmp, with the C-STORE request's UIDs and transfer syntax."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ingest.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    received = ingest.settings.tmp_dir / f"tmp{path.stem}.dcm"
    shutil.copyfile(path, received)
    try:
        return ingest.receive_file(
            received,
            transfer_syntax=str(meta.TransferSyntaxUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            calling_aet="UNIT",
            peer_host="127.0.0.1",
        )
    finally:
        received.unlink()  # pynetdicom removes its own file after the handler returns


def test_a_stored_instance_is_a_valid_part10_file_and_a_row(ingest: Ingest, tmp_path: Path) -> None:
    path = dicomgen.make_chest(tmp_path / "a.dcm")
    outcome = receive(ingest, path)
    assert outcome.status == SUCCESS and not outcome.duplicate
    with ingest.sessions() as session:
        row = session.scalars(select(Instance)).one()
    stored = ingest.settings.instances_dir / row.path
    assert stored.read_bytes() == path.read_bytes()
    assert not list(ingest.settings.tmp_dir.glob("*"))


def test_below_the_disk_reserve_a_store_gets_a700_and_nothing_is_written(
    ingest: Ingest, tmp_path: Path
) -> None:
    ingest.reserve_bytes = 1 << 60
    outcome = receive(ingest, dicomgen.make_chest(tmp_path / "a.dcm"))
    assert outcome.status == OUT_OF_RESOURCES
    assert not ingest.settings.instances_dir.exists() or not any(
        ingest.settings.instances_dir.rglob("*.dcm")
    )


def test_uids_that_could_escape_the_data_directory_are_refused(
    ingest: Ingest, tmp_path: Path
) -> None:
    path = dicomgen.make_chest(tmp_path / "evil.dcm", study_uid="1.2.3")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = "../../etc"
    ds.save_as(path)
    outcome = receive(ingest, path)
    assert outcome.status != SUCCESS
    assert not (tmp_path / "etc").exists()
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        instance_relpath("../x", "1.2")
    assert is_valid_uid("1.2.840.10008.1.2") and not is_valid_uid("1.02.3")


def test_garbage_after_a_valid_meta_header_cannot_be_understood(
    ingest: Ingest, tmp_path: Path
) -> None:
    path = dicomgen.make_chest(tmp_path / "a.dcm")
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(path.read_bytes()[:end] + b"\xff" * 3000)  # valid meta, then garbage
    outcome = receive(ingest, garbage)
    assert outcome.status == CANNOT_UNDERSTAND


def test_grouping_prefers_pa_and_makes_a_new_version_when_a_better_image_arrives(
    ingest: Ingest, tmp_path: Path
) -> None:
    study = pydicom.uid.generate_uid()
    receive(ingest, dicomgen.make_chest(tmp_path / "ap.dcm", study_uid=study, view="AP"))
    receive(ingest, dicomgen.make_chest(tmp_path / "lat.dcm", study_uid=study, view="LATERAL"))
    later = utcnow() + timedelta(seconds=ingest.settings.settle_seconds + 1)
    with ingest.sessions() as session:
        assert settle_due_studies(session, utcnow()) == []  # still in its quiet period
    with ingest.sessions() as session:
        (first,) = settle_due_studies(session, later)
    receive(ingest, dicomgen.make_chest(tmp_path / "pa.dcm", study_uid=study, view="PA"))
    with ingest.sessions() as session:
        (second,) = settle_due_studies(session, later + timedelta(seconds=10))
        jobs = {j.id: j for j in session.scalars(select(Job))}
        views = {i.id: i.view for i in session.scalars(select(Instance))}
        study_row = session.scalars(select(Study)).one()
    assert views[jobs[first].instance_id] == "AP" and views[jobs[second].instance_id] == "PA"
    assert jobs[first].state == "superseded"  # not started yet: the better image replaces it
    assert (jobs[second].version, study_row.version) == (2, 2)

"""What the outputs copy from the source is its checked record: a source with values invalid
for their VR goes through the real ingest and every builder, and each object it gives is
valid (dciodvfy finds no error); the invalid values are left out with one warning each that
names the attribute and the image, never the value; every object carries the same patient
and study attributes; and the real images the tests use give valid objects from every
builder."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dicomgen
import hl7
import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy
from pydicom import Dataset
from sqlalchemy import select

from cxrnode.db import Instance, Job, JobState, Output, Study, make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.hl7.message import decode
from cxrnode.ingest.receive import Ingest
from cxrnode.ingest.record import SourceRecord
from cxrnode.outputs.build import build_outputs, make_objects
from cxrnode.outputs.common import PATIENT_AND_STUDY
from cxrnode.settings import Settings
from model.contracts import ModelResult

ALL_KINDS = ["text_sr", "air_sr", "sc", "pdf"]
#: The attributes of dicomgen.INVALID_VR_VALUES that the outputs copy (all of them).
LEFT_OUT = sorted(dicomgen.INVALID_VR_VALUES)
MODEL_TEXT = (
    "Findings:\tThe heart is enlarged.\tSmall right effusion "
    + b"caf\xc3".decode("utf-8", "replace")
    + ".\nImpression:\tcardiomegaly\ufffd."
)


@dataclass
class Site:
    settings: Settings
    ingest: Ingest
    sessions: Callable
    tmp: Path

    def receive(self, ds: Dataset) -> Instance:
        """Store ``ds`` through the node's real ingest; return its recorded row."""
        path = self.tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        received = self.settings.tmp_dir / path.name
        shutil.copyfile(path, received)
        outcome = self.ingest.receive_file(
            received,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            calling_aet="UNIT",
            peer_host="127.0.0.1",
        )
        received.unlink()
        assert outcome.status == 0, outcome.reason
        with self.sessions() as session:
            instance = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
            )
            session.expunge(instance)
        return instance

    def inferred_job(self, instance: Instance, result: ModelResult) -> int:
        """A job of the instance in state ``inferred``, as the pipeline leaves it."""
        with self.sessions() as session:
            study = session.scalar(
                select(Study).where(Study.study_instance_uid == instance.study_instance_uid)
            )
            job = Job(
                study_id=study.id,
                instance_id=instance.id,
                version=1,
                state=JobState.inferred,
                result=result.to_dict(),
            )
            session.add(job)
            session.commit()
            return job.id


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        min_free_disk_mb=1,
        outputs=ALL_KINDS,
        destinations=["PACS@127.0.0.1:11112"],
        hl7_destinations=["mllp://127.0.0.1:2575"],
    )
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    (tmp_path / "sources").mkdir()
    yield Site(settings, Ingest(settings, sessions), sessions, tmp_path / "sources")
    engine.dispose()


def model_result(report: str = MODEL_TEXT) -> ModelResult:
    return ModelResult(
        report=report,
        differential="Heart failure;\tfluid overload.",
        recommendation="Follow-up\x00 radiograph.",
        findings={"cardiomegaly": "present", "pleural_effusion": "present"},
        model_id="/models/tiny-cxr-llava",
        model_hash="5e" * 32,
        prompts={"report": "default"},
    )


def test_a_source_with_invalid_vr_values_gives_valid_objects_from_ingest_to_every_builder(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    source = dicomgen.build_invalid_vr_chest(modality="CR", rows=256, cols=256)
    instance = site.receive(source)
    job_id = site.inferred_job(instance, model_result())

    with caplog.at_level(logging.WARNING, logger="cxrnode"), site.sessions() as session:
        ids = build_outputs(session, site.settings, job_id)

    with site.sessions() as session:
        rows = list(session.scalars(select(Output).where(Output.id.in_(ids))))
    assert sorted({row.kind for row in rows}) == sorted([*ALL_KINDS, "hl7"])
    for row in rows:
        path = site.settings.outputs_dir / row.path
        if row.kind == "hl7":
            continue
        result = dciodvfy(path)
        assert result.errors == [], (row.kind, result.output)
        written = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in LEFT_OUT:  # Type 2 ones present and empty, the others absent
            assert written.get(keyword) in (None, ""), (row.kind, keyword)
        assert str(written.PatientName) == "SYNTHETIC^PATIENT"  # valid values are copied
        assert written.PatientID == "ANON1"

    # one warning per attribute left out, naming it and the image, never its value
    left_out = [r.getMessage() for r in caplog.records if "left out of the outputs" in r.message]
    assert len(left_out) == len(LEFT_OUT)
    for keyword in LEFT_OUT:
        (line,) = [m for m in left_out if f" {keyword} left out" in m]
        assert str(source.SOPInstanceUID) in line
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for value in dicomgen.INVALID_VR_VALUES.values():  # nor does pydicom quote them
        assert f"'{value}'" not in logged and (len(value) < 5 or value not in logged), value


def test_the_hl7_draft_of_that_source_carries_no_tab_no_unpaired_bytes_and_no_invalid_value(
    site: Site,
) -> None:
    instance = site.receive(dicomgen.build_invalid_vr_chest(rows=256, cols=256))
    job_id = site.inferred_job(instance, model_result())
    with site.sessions() as session:
        ids = build_outputs(session, site.settings, job_id)
        (row,) = session.scalars(select(Output).where(Output.id.in_(ids), Output.kind == "hl7"))

    text = decode((site.settings.outputs_dir / row.path).read_bytes())
    message = hl7.parse(text)
    values = [str(segment(5)) for segment in message.segments("OBX")]
    assert values and all("\t" not in v and "\ufffd" not in v for v in values)
    assert "\t" not in text and "\ufffd" not in text
    assert any("The heart is enlarged. Small right effusion caf." in v for v in values)
    pid = message.segment("PID")
    assert str(pid(5)) == "SYNTHETIC^PATIENT" and str(pid(3)) == "ANON1"
    assert len(pid) <= 7  # PID-7 (the birth date "1962-03-15" is not a DA) and PID-8 (the
    # sex "female" is not a CS) are left out, and the empty fields at the end with them
    assert "ACC-0000000000000042" not in text  # longer than SH allows


def test_every_object_of_one_draft_carries_the_same_patient_and_study_attributes(
    make_draft: Callable[..., ModelResult],
) -> None:
    """The SR copies the Patient Study module and the SC none of it, left to highdicom."""
    source = dicomgen.build_chest(
        rows=96,
        cols=80,
        patient_age="062Y",
        extra={
            "PatientWeight": "71.5",
            "PatientSize": "1.68",
            "StudyDescription": "XR CHEST PA",
            "IssuerOfPatientID": "HOSP",
        },
    )
    objects = dict(
        make_objects(
            SourceRecord.from_dataset(source),
            np.zeros((96, 80), np.uint8),
            make_draft(),
            version=1,
            predecessors={},
            settings=Settings(outputs=ALL_KINDS),
        )
    )

    def carried(ds: Dataset) -> dict[str, str | None]:
        return {k: (str(ds[k].value) if k in ds else None) for k in PATIENT_AND_STUDY}

    sr = carried(objects["text_sr"])
    assert sr["PatientAge"] == "062Y" and sr["StudyDescription"] == "XR CHEST PA"
    assert float(sr["PatientWeight"] or 0) == 71.5 and sr["IssuerOfPatientID"] == "HOSP"
    for kind in ("air_sr", "sc", "pdf"):
        assert carried(objects[kind]) == sr, kind


def _source_path(name: str, tmp_path: Path) -> Path:
    if name == "digitised film (SC)":
        return dicomgen.chest_secondary_capture(tmp_path / "film.dcm")
    return dicomgen.pydicom_data_chest(name)


@pytest.mark.parametrize("name", [*dicomgen.PYDICOM_DATA_RADIOGRAPHS, "digitised film (SC)"])
def test_every_builder_gives_a_valid_object_for_the_real_radiographs(
    name: str, make_draft: Callable[..., ModelResult], tmp_path: Path
) -> None:
    header = pydicom.dcmread(_source_path(name, tmp_path), stop_before_pixels=True)
    draft = make_draft(report="Findings:\tclear lungs\ufffd.\r\nImpression:\tnormal\x00.")
    objects = make_objects(
        SourceRecord.from_dataset(header),
        np.full((300, 280), 90, np.uint8),
        draft,
        version=1,
        predecessors={},
        settings=Settings(outputs=ALL_KINDS),
    )

    assert sorted(kind for kind, _ in objects) == sorted(ALL_KINDS)
    for kind, ds in objects:
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = dciodvfy(path)
        assert result.errors == [], (name, kind, result.output)
        assert str(ds.PatientName) == str(header.PatientName)
        assert ds.StudyInstanceUID == header.StudyInstanceUID

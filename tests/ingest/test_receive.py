"""The DICOM listener against real dcmtk peers: what is accepted, stored, refused and grouped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dicomgen
import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from services import echoscu, storescu, wait_for
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cxrnode.db import Instance, Job, Study


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta group: what travels over the network."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_length = int(ds.file_meta.FileMetaInformationGroupLength)
    start = 128 + 4 + 12 + meta_length  # preamble, "DICM", group-length element, group
    return raw[start:]


def significant(ds: pydicom.Dataset) -> dict:
    """Every element's value except group lengths and Data Set Trailing Padding."""
    return {
        elem.tag: elem.value for elem in ds if elem.tag.element != 0x0000 and elem.tag != 0xFFFCFFFC
    }


def rows(database_url: str, model: type) -> list:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(model)).all())
    finally:
        engine.dispose()


def dcmsend(port: int, *files: Path, calling: str = "DCMSEND") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "/usr/bin/dcmsend",
            "-v",
            "-aet",
            calling,
            "-aec",
            "CXRNODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pynetdicom_store(
    port: int, path: Path, calling: str = "PYSCU", sop_class: str = ComputedRadiographyImageStorage
) -> int:
    """Send a file's dataset bytes exactly as they are in the file (pynetdicom's chunked
    sending streams them without decoding or re-encoding)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


@pytest.fixture
def variants(tmp_path: Path) -> list[Path]:
    """The real pydicom-data chest (uncompressed and J2K) and synthetic CR/DX variants."""
    study = pydicom.uid.generate_uid()
    out = tmp_path / "send"
    files = [dicomgen.pydicom_data_chest("RG1_UNCR"), dicomgen.pydicom_data_chest("RG1_J2KR")]
    specs = [
        dict(modality="CR", photometric="MONOCHROME1", bits_stored=12, voi="window"),
        dict(modality="DX", photometric="MONOCHROME2", bits_stored=14, voi="lut"),
        dict(modality="DX", photometric="MONOCHROME2", bits_stored=16, voi="window", view="AP"),
        dict(modality="DX", for_processing=True, bits_stored=12, voi="window"),
    ]
    for index, spec in enumerate(specs):
        files.append(dicomgen.make_chest(out / f"v{index}.dcm", study_uid=study, **spec))
    for kind in ("jpeg-lossless", "jpeg-ls"):  # each copy from its own source: new UIDs
        source = dicomgen.make_chest(out / f"src-{kind}.dcm", study_uid=study, bits_stored=12)
        files.append(dicomgen.compress(source, out / f"{kind}.dcm", kind))
    return files


def test_echo_answers_success(make_node) -> None:
    node = make_node("--no-workers")
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr


def test_every_accepted_instance_is_stored_byte_identical_and_recorded(
    make_node, database_url: str, variants: list[Path]
) -> None:
    node = make_node("--no-workers", database_url=database_url)
    result = dcmsend(node.port, *variants)
    assert result.returncode == 0, result.stdout + result.stderr

    recorded = {row.sop_instance_uid: row for row in rows(database_url, Instance)}
    assert len(recorded) == len(variants)
    for path in variants:
        sent = pydicom.dcmread(path)
        row = recorded[sent.SOPInstanceUID]
        stored_path = node.data_dir / "instances" / row.path
        stored = pydicom.dcmread(stored_path)
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID  # not transcoded
        # dcmtk re-encodes a dataset it reads (it drops group lengths and trailing padding),
        # so what it sent is compared element by element, pixel bytes included.
        assert significant(stored) == significant(sent), path.name


@pytest.mark.parametrize("tuning", ["true", "false"], ids=["tuned", "stock-pynetdicom"])
def test_the_bytes_a_peer_sends_are_the_bytes_stored(
    make_node, variants: list[Path], tuning: str
) -> None:
    """pynetdicom streams a file's dataset bytes as they are: the stored dataset must be
    byte-identical, real radiograph and compressed copies included, with the receive tuning
    (whole-PDU reads, write-behind of the 7 MB radiograph) and without it."""
    node = make_node("--no-workers", receive_tuning=tuning)
    for path in variants:
        sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
        assert pynetdicom_store(node.port, path, sop_class=sop_class) == 0x0000
    database = f"sqlite:///{node.data_dir / 'cxrnode.db'}"
    recorded = {row.sop_instance_uid: row for row in rows(database, Instance)}
    for path in variants:
        row = recorded[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        assert dataset_bytes(node.data_dir / "instances" / row.path) == dataset_bytes(path)


def test_bad_inputs_get_the_right_status_and_the_node_keeps_serving(
    make_node, tmp_path: Path
) -> None:
    node = make_node("--no-workers")
    good = dicomgen.make_chest(tmp_path / "good.dcm", modality="CR")
    truncated = dicomgen.truncate(good, tmp_path / "trunc.dcm", 0.6)
    no_pixels = dicomgen.make_no_pixels(tmp_path / "nopix.dcm", modality="CR")
    garbage = tmp_path / "garbage.dcm"
    header = pydicom.dcmread(good, stop_before_pixels=True)
    meta_end = len(good.read_bytes()) - len(dataset_bytes(good))
    garbage.write_bytes(
        good.read_bytes()[:meta_end] + dicomgen.make_garbage(tmp_path / "g.bin", 5000).read_bytes()
    )
    assert header.file_meta.MediaStorageSOPClassUID == ComputedRadiographyImageStorage

    assert pynetdicom_store(node.port, truncated) == 0xC000
    assert pynetdicom_store(node.port, garbage) == 0xC000
    assert pynetdicom_store(node.port, no_pixels) == 0xA900

    ct = dicomgen.make_ct(tmp_path / "ct.dcm")
    refused = storescu(node.port, ct)
    assert refused.returncode != 0
    assert "no presentation context" in (refused.stdout + refused.stderr).lower()

    hand = dicomgen.make_non_chest(tmp_path / "hand.dcm")
    assert storescu(node.port, hand, good).returncode == 0
    assert echoscu(node.port).returncode == 0

    database = f"sqlite:///{node.data_dir / 'cxrnode.db'}"
    recorded = {row.sop_instance_uid: row for row in rows(database, Instance)}
    assert set(recorded) == {
        pydicom.dcmread(hand, stop_before_pixels=True).SOPInstanceUID,
        header.SOPInstanceUID,
    }
    hand_row = recorded[pydicom.dcmread(hand, stop_before_pixels=True).SOPInstanceUID]
    assert hand_row.state == "skipped" and "chest" in hand_row.skip_reason
    assert "PatientName" not in node.log() and "ANON1" not in node.log()


def test_unknown_calling_ae_is_refused_and_host_pinning_holds(make_node) -> None:
    node = make_node("--no-workers", allowed_calling_aets="GOODSCU,PINNED@10.255.0.1")
    assert echoscu(node.port, calling="GOODSCU").returncode == 0
    refused = echoscu(node.port, calling="STRANGER")
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()
    assert echoscu(node.port, calling="PINNED").returncode != 0  # right AE, wrong host
    assert echoscu(node.port, called="NOTUS").returncode != 0  # wrong called AE title


def test_the_same_instance_sent_twice_is_stored_once(make_node, tmp_path: Path) -> None:
    node = make_node("--no-workers")
    path = dicomgen.make_chest(tmp_path / "once.dcm")
    assert storescu(node.port, path).returncode == 0
    assert storescu(node.port, path).returncode == 0
    database = f"sqlite:///{node.data_dir / 'cxrnode.db'}"
    assert len(rows(database, Instance)) == 1
    assert len(list((node.data_dir / "instances").rglob("*.dcm"))) == 1


def test_a_study_settles_into_exactly_one_job_for_its_pa_image(
    make_node, database_url: str, tmp_path: Path
) -> None:
    node = make_node("--no-workers", database_url=database_url, settle_seconds="1")
    study = pydicom.uid.generate_uid()
    lateral = dicomgen.make_chest(tmp_path / "lat.dcm", study_uid=study, view="LATERAL")
    ap = dicomgen.make_chest(tmp_path / "ap.dcm", study_uid=study, view="AP")
    pa = dicomgen.make_chest(tmp_path / "pa.dcm", study_uid=study, view="PA", use_view_code=True)
    only_lateral = dicomgen.make_chest(tmp_path / "lat2.dcm", view="LL")
    hand = dicomgen.make_non_chest(tmp_path / "hand.dcm")
    assert storescu(node.port, lateral, ap, pa, only_lateral, hand).returncode == 0

    def settled() -> list:
        studies = rows(database_url, Study)
        return studies if all(s.state != "receiving" for s in studies) else []

    studies = {s.study_instance_uid: s for s in wait_for(settled, 30, "studies to settle")}
    jobs = rows(database_url, Job)
    assert len(jobs) == 1
    instances = {i.id: i for i in rows(database_url, Instance)}
    assert instances[jobs[0].instance_id].sop_instance_uid == pydicom.dcmread(pa).SOPInstanceUID
    assert studies[study].state == "settled"
    lateral_study = pydicom.dcmread(only_lateral).StudyInstanceUID
    assert studies[lateral_study].skip_reason == "only lateral views"
    hand_study = studies[pydicom.dcmread(hand).StudyInstanceUID]
    assert hand_study.state == "skipped" and "chest" in hand_study.skip_reason

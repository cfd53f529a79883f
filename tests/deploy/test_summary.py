"""The start-up summary, the root note and the demo image, without starting a node."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cxrnode.cli.demo import chest_dataset
from cxrnode.ingest.receive import inspect
from cxrnode.jobs.tracking import WorkerInfo
from cxrnode.node import CELERY_ROOT_WARNING_FILTER, root_note, startup_summary, worker_environment
from cxrnode.settings import Settings


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **values)


def row(summary: str, name: str) -> str:
    return next(line for line in summary.splitlines() if line.split()[:1] == [name.split()[0]])


def test_the_summary_names_identity_ports_data_mode_outputs_model_and_web(tmp_path: Path) -> None:
    text = startup_summary(
        settings(tmp_path, ae_title="AICXR", dicom_port=104, http_port=8081), True, 2
    )
    assert text.splitlines()[0].startswith("cxrnode ")
    assert "AICXR" in row(text, "AE") and "callers: any calling AE title" in row(text, "AE")
    assert row(text, "DICOM").endswith("0.0.0.0:104, 2 listener processes")
    assert str(tmp_path / "data") in row(text, "data")
    assert row(text, "mode").startswith(
        "  mode       embedded: SQLite cxrnode.db and a redis-server"
    )
    # no model yet: one worker, no inference process of its own
    assert "started here: one for prepare,outputs,send,infer" in row(text, "workers")
    assert "no DESTINATIONS" in row(text, "outputs")
    assert "not set" in row(text, "model") and "waiting_model" in row(text, "model")
    assert row(text, "web").split()[1] == "http://127.0.0.1:8081/"
    assert "30 days after delivery" in row(text, "retention")
    assert "cxrnode demo --send" in row(text, "try")
    assert max(len(line) for line in text.splitlines()) <= 110, "fits a terminal"


def test_distributed_mode_hides_passwords_and_tells_where_the_workers_go(tmp_path: Path) -> None:
    text = startup_summary(
        settings(
            tmp_path,
            database_url="postgresql+psycopg://cxrnode:s3cret@db/cxrnode",
            broker_url="redis://:hunter2@redis:6379/0",
            destinations="PACS@10.0.0.5:104",
            allowed_calling_aets="PACS@10.0.0.5",
            tls_port=2762,
            tls_cert="/etc/c.pem",
            tls_key="/etc/k.pem",
        ),
        False,
        4,
    )
    assert "s3cret" not in text and "hunter2" not in text
    assert "distributed: database postgresql+psycopg://cxrnode:***@db/cxrnode;" in text
    assert "broker redis://:***@redis:6379/0" in text
    assert "none here (--no-workers)" in row(text, "workers")
    assert "--queues infer" in row(text, "workers")
    assert row(text, "outputs").endswith("text_sr, sc -> PACS@10.0.0.5:104")
    assert "callers: PACS@10.0.0.5" in row(text, "AE")
    assert "DICOM TLS on 2762" in row(text, "DICOM")


def test_the_model_line_says_what_the_node_knows_without_loading_it(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model-00001-of-00002.safetensors").write_bytes(b"")
    (checkpoint / "model-00002-of-00002.safetensors").write_bytes(b"")
    text = startup_summary(settings(tmp_path, model=str(checkpoint)), True, 1)
    assert f"{checkpoint} (config.json, 2 safetensors file(s))" in row(text, "model")
    assert "hash once a worker has loaded it" in row(text, "model")
    hub = startup_summary(settings(tmp_path, model="ECOFRI/CXR-LLAVA-v2"), True, 1)
    assert "hub id ECOFRI/CXR-LLAVA-v2" in row(hub, "model")
    elsewhere = startup_summary(settings(tmp_path, model="/models/cxr-llava"), False, 1)
    assert "not found on this host" in row(elsewhere, "model")
    worker = WorkerInfo(
        "infer-1@gpu1",
        ("infer",),
        "gpu1",
        1,
        state={"model": "loaded", "model_id": "/models/cxr-llava", "model_hash": "ab" * 32},
    )
    loaded = startup_summary(settings(tmp_path, model="/models/cxr-llava"), False, 1, [worker])
    assert "loaded by 1 inference worker(s), hash " + "ab" * 32 in row(loaded, "model")


def test_root_gets_one_line_and_allow_root_silences_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrnode.node as node

    monkeypatch.setattr(node, "running_as_root", lambda: True)
    assert "CXRNODE_ALLOW_ROOT" in root_note(settings(tmp_path))
    assert "running as root" in startup_summary(settings(tmp_path), True, 1)
    assert root_note(settings(tmp_path, allow_root=True)) is None
    monkeypatch.setattr(node, "running_as_root", lambda: False)
    assert root_note(settings(tmp_path)) is None
    env = worker_environment({"PYTHONWARNINGS": "error::DeprecationWarning"}, supervised=True)
    assert env["PYTHONWARNINGS"] == f"error::DeprecationWarning,{CELERY_ROOT_WARNING_FILTER}"
    assert env["_CXRNODE_SUPERVISED"] == "1"


def test_the_demo_image_is_a_chest_pa_the_node_accepts() -> None:
    ds = chest_dataset(size=256)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header = inspect(
        buffer,
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        start=_dataset_start(buffer),
    )
    assert header.skip_reason is None and header.view == "PA" and header.modality == "CR"
    assert chest_dataset(size=64).StudyInstanceUID != ds.StudyInstanceUID, "a new study each time"
    assert json.dumps(header.recorded)


def _dataset_start(buffer: io.BytesIO) -> int:
    from cxrnode.ingest.receive import dataset_offset

    return dataset_offset(buffer)

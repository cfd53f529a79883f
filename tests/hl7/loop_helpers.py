"""Helpers of the HL7 and monitoring tests: a real MLLP peer, an MLLP client that sends raw
bytes, ORU^R01 messages as a RIS writes them, and a node database seeded with a drafted study.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hl7
import pydicom
from hl7.mllp import start_hl7_server
from sqlalchemy.orm import sessionmaker

from cxrnode.db import Instance, InstanceState, Job, JobState, Study, StudyState, utcnow
from cxrnode.ingest.header import recorded_header
from cxrnode.ingest.storage import instance_relpath
from cxrnode.settings import Settings

VT, FS_CR = b"\x0b", b"\x1c\r"
MODEL_HASH = "cd" * 32
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


# ------------------------------------------------------------------------------ the RIS side


@dataclass
class MllpPeer:
    """A RIS-like MLLP server (python-hl7's asyncio server) that records what it receives and
    answers each message with ``ack(message)`` (AA by default)."""

    ack: Callable[[hl7.Message], str] = lambda _message: "AA"
    received: list[str] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def messages(self) -> list[hl7.Message]:
        with self.lock:
            return [hl7.parse(text) for text in self.received]


@contextlib.contextmanager
def mllp_peer(ack: Callable[[hl7.Message], str] | str = "AA") -> Iterator[MllpPeer]:
    """Run an :class:`MllpPeer` on a free loopback port in a thread."""
    peer = MllpPeer(ack if callable(ack) else (lambda _message, code=ack: code))
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None

    async def handle(reader, writer) -> None:  # noqa: ANN001 - python-hl7 stream objects
        try:
            while True:
                try:
                    message = await reader.readmessage()
                except asyncio.IncompleteReadError:
                    return
                with peer.lock:
                    peer.received.append(str(message))
                writer.writemessage(message.create_ack(peer.ack(message)))
                await writer.drain()
        finally:
            writer.close()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = await start_hl7_server(handle, "127.0.0.1", 0, encoding="utf-8")
        peer.port = server.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the MLLP peer did not start"
    try:
        yield peer
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def exchange(
    port: int, *payloads: bytes, framed: bool = True, timeout: float = 30.0
) -> list[bytes]:
    """Send each payload over one MLLP connection and read one ACK after each; return the
    ACK bodies (without framing)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for payload in payloads:
            sock.sendall(VT + payload + FS_CR if framed else payload)
            answers.append(read_frame(sock))
    return answers


def read_frame(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(FS_CR):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the peer closed the connection; got {data!r}")
        data += chunk
    assert data.startswith(VT), data
    return data[1:-2]


def ack_fields(ack: bytes) -> dict[str, list[str]]:
    """Segments of an ACK by name, each split into fields."""
    return {
        segment[:3]: segment.split("|")
        for segment in ack.decode("utf-8").split("\r")
        if len(segment) >= 3
    }


def oru(
    *,
    accession: str = "",
    patient_id: str = "",
    text: str | list[str] = "No acute cardiopulmonary process.",
    status: str = "F",
    control_id: str | None = None,
    sender: str = "RIS",
    study_uid: str = "",
    value_type: str = "TX",
) -> bytes:
    """An ORU^R01 as a RIS sends a signed report: one OBX per line of ``text``."""
    control_id = control_id or uuid.uuid4().hex[:20]
    lines = [text] if isinstance(text, str) else text
    segments = [
        f"MSH|^~\\&|{sender}|HOSP|CXRNODE|HOSP|20261129120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{patient_id}^^^HOSP||DOE^JANE||19700101|F",
        f"OBR|1||{accession}|71045^XR CHEST 1V^CPT|||20261129110000|||||||||||||||20261129115900||RAD|{status}",
    ]
    segments += [
        f"OBX|{n}|{value_type}|18782-3^Study observation^LN||{line}||||||{status}"
        for n, line in enumerate(lines, start=1)
    ]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^RIS^Application^DICOM")
    return ("\r".join(segments) + "\r").encode("utf-8")


# ---------------------------------------------------------------------- a drafted study


def model_result(findings: dict[str, str] | None = None, model_hash: str = MODEL_HASH) -> dict:
    """A model answer in the ModelResult.to_dict() shape."""
    states = dict.fromkeys(FINDINGS, "not_mentioned")
    states.update(findings or {})
    return {
        "report": "AI report text.",
        "differential": "",
        "recommendation": "",
        "findings": states,
        "model_id": "/models/tiny",
        "model_hash": model_hash,
    }


def seed_study(
    sessions: sessionmaker,
    study_uid: str,
    *,
    accession: str | None = None,
    patient_id: str = "PAT-1",
    findings: dict[str, str] | None = None,
    state: JobState = JobState.done,
    model_hash: str = MODEL_HASH,
) -> tuple[int, int]:
    """Record a study with one image and a job, as the pipeline leaves them; return
    (study id, job id)."""
    now = utcnow()
    header = {
        "0020000D": {"vr": "UI", "Value": [study_uid]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
    }
    if accession:
        header["00080050"] = {"vr": "SH", "Value": [accession]}
    with sessions() as session:
        study = Study(
            study_instance_uid=study_uid,
            state=StudyState.settled,
            settle_at=now,
            accession_number=accession,
            version=1,
        )
        session.add(study)
        session.flush()
        sop = f"{study_uid}.1"
        instance = Instance(
            sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            study_instance_uid=study_uid,
            series_instance_uid=f"{study_uid}.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="DX",
            body_part="CHEST",
            view="PA",
            path=f"{study_uid}/{sop}.dcm",
            size_bytes=1,
            calling_aet="TEST",
            state=InstanceState.stored,
            study_id=study.id,
            header=header,
        )
        session.add(instance)
        session.flush()
        job = Job(
            study_id=study.id,
            instance_id=instance.id,
            version=1,
            state=state,
            result=model_result(findings, model_hash),
        )
        session.add(job)
        session.commit()
        return study.id, job.id


def inferred_job_from_file(
    settings: Settings,
    sessions: sessionmaker,
    source: Path,
    result: dict,
    *,
    calling_aet: str = "TEST",
) -> int:
    """Store ``source`` as the node stores a received instance (its file under DATA_DIR, its
    recorded header) with its settled study and an inferred job holding ``result``, as the
    pipeline leaves them before the outputs step; return the job id."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    relpath = instance_relpath(ds.StudyInstanceUID, ds.SOPInstanceUID)
    target = settings.instances_dir / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    accession = str(ds.get("AccessionNumber", "")) or None
    with sessions() as session:
        study = Study(
            study_instance_uid=ds.StudyInstanceUID,
            state=StudyState.settled,
            settle_at=utcnow(),
            accession_number=accession,
            version=1,
        )
        session.add(study)
        session.flush()
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
            calling_aet=calling_aet,
            state=InstanceState.stored,
            study_id=study.id,
            header=recorded_header(ds),
        )
        session.add(instance)
        session.flush()
        job = Job(
            study_id=study.id,
            instance_id=instance.id,
            version=1,
            state=JobState.inferred,
            result=result,
        )
        session.add(job)
        session.commit()
        return job.id


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())

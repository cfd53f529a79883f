"""The MLLP listener of the monitor process, over a real network: final reports are stored,
recorded, matched, scored and acknowledged; bad input gets the right ACK, is kept and recorded,
and the listener goes on serving.

The listener runs in-process (the same ``Monitor`` that ``cxrnode serve`` starts in its monitor
process) on a real TCP port with a real SQLite database; the tests speak MLLP over sockets.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).parent))

from loop_helpers import (  # noqa: E402
    VT,
    ack_fields,
    exchange,
    files_under,
    oru,
    read_frame,
    seed_study,
)
from services import free_port, wait_for  # noqa: E402

from cxrnode.db import (  # noqa: E402
    Agreement,
    FinalReport,
    ReportState,
    ReportStatus,
    make_engine,
    make_sessionmaker,
)
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.hl7.mllp import Block  # noqa: E402
from cxrnode.hl7.oru import build_oru  # noqa: E402
from cxrnode.hl7.receive import Hl7Receiver  # noqa: E402
from cxrnode.monitor.reports import reports_dir  # noqa: E402
from cxrnode.monitor.service import Monitor  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402
from model.contracts import ModelResult  # noqa: E402


@dataclass
class Listening:
    settings: Settings
    sessions: sessionmaker
    port: int

    def reports(self) -> list[FinalReport]:
        with self.sessions() as session:
            return list(session.scalars(select(FinalReport).order_by(FinalReport.id)))

    def report(self, report_id: int) -> FinalReport:
        with self.sessions() as session:
            row = session.get(FinalReport, report_id)
            assert row is not None
            return row

    def agreement(self, study_id: int) -> dict[str, tuple[str, str]]:
        with self.sessions() as session:
            rows = session.scalars(select(Agreement).where(Agreement.study_id == study_id))
            return {row.finding: (row.ai, row.radiologist) for row in rows}

    def radiologist(self, study_id: int, finding: str) -> str | None:
        pair = self.agreement(study_id).get(finding)
        return None if pair is None else pair[1]


@pytest.fixture(scope="module")
def listening(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listening]:
    data = tmp_path_factory.mktemp("mllp-node")
    settings = Settings(
        data_dir=data,
        hl7_port=free_port(),
        hl7_host="127.0.0.1",
        min_free_disk_mb=1,
        network_timeout=5,
        monitor_interval_seconds=0.3,
        hl7_accession_fields=["OBR-3"],
    )
    engine = make_engine(f"sqlite:///{data / 'node.db'}")
    upgrade(engine)
    reader = make_engine(f"sqlite:///{data / 'node.db'}", read_only=True)
    sessions = make_sessionmaker(engine)
    monitor = Monitor(settings, sessions, make_sessionmaker(reader))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(monitor.run(stop),))
    thread.start()
    assert settings.hl7_port is not None
    port = settings.hl7_port
    wait_for(lambda: _answers(port), 10, "the MLLP listener")
    try:
        yield Listening(settings, sessions, port)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()
        engine.dispose()
        reader.dispose()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def msa(ack: bytes) -> tuple[str, str, str]:
    fields = ack_fields(ack)["MSA"] + ["", "", ""]
    return fields[1], fields[2], fields[3]


def err_code(ack: bytes) -> str:
    return ack_fields(ack)["ERR"][3].split("^")[0]


def newest_report(listening: Listening) -> FinalReport:
    return listening.reports()[-1]


# ------------------------------------------------------------------------------ acceptance


def test_a_final_report_is_stored_recorded_matched_and_scored_before_and_after_its_ack(
    listening: Listening,
) -> None:
    study_id, job_id = seed_study(
        listening.sessions,
        "1.2.826.0.1.3680043.10.1.1",
        accession="ACC-1",
        patient_id="PAT-1",
        findings={"cardiomegaly": "present", "pleural_effusion": "present", "no_finding": "absent"},
    )
    message = oru(
        accession="ACC-1",
        patient_id="PAT-1",
        text=["FINDINGS: Mild cardiomegaly.", "No pleural effusion or pneumothorax."],
        control_id="MSG-0001",
    )

    (ack,) = exchange(listening.port, message)

    code, control_id, text = msa(ack)
    assert (code, control_id) == ("AA", "MSG-0001")
    assert "matched by accession number and patient ID" in text
    row = newest_report(listening)
    assert (row.state, row.status, row.study_id, row.answer) == (
        ReportState.matched,
        ReportStatus.final,
        study_id,
        "AA",
    )
    assert row.accession_number == "ACC-1" and row.patient_id == "PAT-1"
    stored = reports_dir(listening.settings) / row.path
    assert stored.read_bytes() == message  # the bytes as received, durably in DATA_DIR/reports
    assert row.labels["cardiomegaly"] == "present"
    assert row.labels["pleural_effusion"] == "absent"

    wait_for(lambda: len(listening.agreement(study_id)) == 9, 10, "the study to be scored")
    pairs = listening.agreement(study_id)
    assert pairs["cardiomegaly"] == ("present", "present")
    assert pairs["pleural_effusion"] == ("present", "absent")
    assert pairs["pneumothorax"] == ("not_mentioned", "absent")
    with listening.sessions() as session:
        assert {a.job_id for a in session.scalars(select(Agreement))} >= {job_id}


def test_a_final_report_replaces_a_preliminary_one_a_correction_rescores_a_cancel_withdraws(
    listening: Listening,
) -> None:
    study_id, _ = seed_study(
        listening.sessions,
        "1.2.826.0.1.3680043.10.1.2",
        accession="ACC-2",
        findings={"pleural_effusion": "present"},
    )

    def send(status: str, text: str) -> None:
        (ack,) = exchange(listening.port, oru(accession="ACC-2", status=status, text=text))
        assert msa(ack)[0] == "AA", ack

    def effusion_becomes(state: str | None) -> None:
        wait_for(
            lambda: listening.radiologist(study_id, "pleural_effusion") == state,
            10,
            f"the radiologist's effusion to be {state}",
        )

    send("P", "Small left pleural effusion.")
    effusion_becomes("present")
    send("F", "No pleural effusion.")
    effusion_becomes("absent")
    send("P", "Large left pleural effusion.")  # a preliminary after the final: ignored
    time.sleep(0.5)
    assert listening.radiologist(study_id, "pleural_effusion") == "absent"
    send("C", "Small right pleural effusion, missed on the first reading.")
    effusion_becomes("present")
    send("X", "")  # the report is withdrawn: nothing to compare with
    wait_for(lambda: listening.agreement(study_id) == {}, 10, "the agreement to be withdrawn")
    statuses = [r.status for r in listening.reports() if r.accession_number == "ACC-2"]
    assert statuses == [
        ReportStatus.preliminary,
        ReportStatus.final,
        ReportStatus.preliminary,
        ReportStatus.corrected,
        ReportStatus.cancelled,
    ]


def test_a_report_for_an_unknown_study_is_kept_and_matched_when_the_study_arrives(
    listening: Listening,
) -> None:
    (ack,) = exchange(listening.port, oru(accession="LATE-1", text="Right lower lobe pneumonia."))
    code, _, text = msa(ack)
    assert code == "AA" and "no study with this accession number yet" in text
    row = newest_report(listening)
    assert row.state == ReportState.unmatched and row.study_id is None

    study_id, _ = seed_study(
        listening.sessions, "1.2.826.0.1.3680043.10.1.3", accession="LATE-1", patient_id="PAT-1"
    )

    wait_for(lambda: len(listening.agreement(study_id)) == 9, 10, "the sweep to match and score")
    assert listening.report(row.id).state == ReportState.matched
    assert listening.radiologist(study_id, "pneumonia") == "present"


def test_an_accession_number_of_another_patient_does_not_match(listening: Listening) -> None:
    seed_study(
        listening.sessions, "1.2.826.0.1.3680043.10.1.4", accession="ACC-4", patient_id="PAT-4"
    )
    (ack,) = exchange(listening.port, oru(accession="ACC-4", patient_id="SOMEONE-ELSE"))
    assert msa(ack)[0] == "AA"
    row = newest_report(listening)
    assert row.state == ReportState.unmatched
    assert row.reason == "a study has this accession number but another patient ID"


def test_the_same_message_twice_is_recorded_once(listening: Listening) -> None:
    message = oru(accession="ACC-DUP", control_id="MSG-DUP")
    before = len(listening.reports())
    first, second = exchange(listening.port, message, message)
    assert msa(first)[0] == msa(second)[0] == "AA"
    assert "duplicate of report" in msa(second)[2]
    assert len(listening.reports()) == before + 1


def test_our_own_draft_coming_back_from_the_ris_is_kept_and_ignored(listening: Listening) -> None:
    from pydicom import Dataset

    header = Dataset()
    header.StudyInstanceUID, header.SOPInstanceUID = "1.2.3.4", "1.2.3.4.5"
    header.SOPClassUID, header.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.6"
    header.AccessionNumber = "ACC-1"
    draft = ModelResult(
        report="Cardiomegaly.",
        differential="",
        recommendation="",
        findings={"cardiomegaly": "present"},
        model_id="/models/tiny",
        model_hash="ef" * 32,
        pipeline_version="0.1.0",
    )
    ours = build_oru(header, draft, version=1, made_at=time_now())

    (ack,) = exchange(listening.port, ours.encode())

    assert msa(ack)[:2] == ("AA", ours.control_id)
    row = newest_report(listening)
    assert row.state == ReportState.ignored and "our own AI draft" in row.reason


def time_now():  # noqa: ANN201
    from cxrnode.db import utcnow

    return utcnow()


# ------------------------------------------------------------------------------- bad input

OBR_TAIL = b"|" * 22 + b"F"  # OBR-4 to OBR-24 empty, OBR-25 (result status) F

MALFORMED = [
    pytest.param(
        b"OBR|1||ACC-X" + OBR_TAIL + b"\rMSH|^~\\&|RIS|H|CXRNODE|H|2026||ORU^R01|BAD-1|P|2.5.1\r",
        "AR",
        "100",
        "does not start with an MSH",
        id="MSH not first",
    ),
    pytest.param(
        b"MSH|^~\\&|RIS|H|CXRNODE|H|2026||ORU^R01|BAD-2|P|2.5.1\rPID|1||P1\r"
        b"OBX|1|TX|x^y||Cardiomegaly.||||||F\rOBR|1||ACC-X" + OBR_TAIL + b"\r",
        "AR",
        "100",
        "OBX before any OBR",
        id="OBX before OBR",
    ),
    pytest.param(
        b"MSH|^~\\&|RIS|H|CXRNODE|H|2026||ORU^R01||P|2.5.1\rOBR|1||ACC-X" + OBR_TAIL + b"\r"
        b"OBX|1|TX|x^y||Cardiomegaly.||||||F\r",
        "AR",
        "101",
        "MSH-10",
        id="MSH-10 missing",
    ),
    pytest.param(
        b"MSH|*~\\&|RIS|H|CXRNODE|H|2026||ORU*R01|BAD-4|P|2.5.1\rOBR|1||ACC-X\r",
        "AR",
        "102",
        "encoding characters",
        id="wrong encoding characters",
    ),
    pytest.param(
        b"MSH#^~\\&#RIS#H#CXRNODE#H#2026##ORU^R01#BAD-5#P#2.5.1\rOBR#1\r",
        "AR",
        "102",
        "field separator",
        id="wrong field separator",
    ),
    pytest.param(
        b"MSH|^~\\&|RIS|H|CXRNODE|H|2026||ADT^A08|BAD-6|P|2.5.1\rPID|1||P1\r",
        "AR",
        "200",
        "not ORU",
        id="not an ORU",
    ),
    pytest.param(
        b"MSH|^~\\&|RIS|H|CXRNODE|H|2026||ORU^R01|BAD-7|P|2.5.1\r"
        b"OBR|1||ACC-X" + OBR_TAIL + b"\rOBX|1|CWE|x^y||a^b^SCT||||||F\r",
        "AR",
        "101",
        "no report text",
        id="no report text",
    ),
    pytest.param(
        b"MSH|^~\\&|RIS|H|CXRNODE|H|2026||ORU^R01|BAD-8|T|2.5.1\rOBR|1\r",
        "AR",
        "202",
        "processing ID",
        id="training message",
    ),
]


@pytest.mark.parametrize(("message", "code", "error", "reason"), MALFORMED)
def test_a_malformed_message_is_refused_with_a_reason_kept_recorded_and_the_next_is_served(
    listening: Listening, message: bytes, code: str, error: str, reason: str
) -> None:
    files_before = len(files_under(reports_dir(listening.settings) / "hl7"))
    good = oru(accession="ACC-GOOD")

    refused, accepted = exchange(listening.port, message, good)  # one connection, in order

    ack_code, _, text = msa(refused)
    assert (ack_code, err_code(refused)) == (code, error)
    assert reason in text
    assert reason in ack_fields(refused)["ERR"][8]
    rejected = [r for r in listening.reports() if r.state == ReportState.rejected][-1]
    assert reason in rejected.reason and rejected.answer == code
    assert (reports_dir(listening.settings) / rejected.path).read_bytes() == message
    assert msa(accepted)[0] == "AA"  # the listener reads on, in step
    assert len(files_under(reports_dir(listening.settings) / "hl7")) == files_before + 2


def test_a_10_mb_message_is_read_to_its_end_refused_kept_in_part_and_the_next_is_served(
    listening: Listening,
) -> None:
    body = "Normal chest. " * (10 * 1024 * 1024 // 14)
    huge = oru(accession="ACC-HUGE", text=body, control_id="HUGE-1")
    assert len(huge) > 10 * 1024 * 1024

    refused, accepted = exchange(listening.port, huge, oru(accession="ACC-GOOD"))

    assert msa(refused)[:2] == ("AR", "HUGE-1")  # the ACK still names the message
    assert (
        "more than HL7_MAX_MESSAGE_BYTES" in msa(refused)[2]
        or "HL7_MAX" in ack_fields(refused)["ERR"][8]
    )
    assert msa(accepted)[0] == "AA"
    rejected = [r for r in listening.reports() if r.state == ReportState.rejected][-1]
    kept = (reports_dir(listening.settings) / rejected.path).read_bytes()
    assert len(kept) == listening.settings.hl7_max_message_bytes
    assert huge.startswith(kept)
    assert f"{len(huge)} bytes" in rejected.reason


def test_a_frame_cut_short_is_recorded_and_the_listener_keeps_serving(
    listening: Listening,
) -> None:
    partial = oru(accession="ACC-CUT", control_id="CUT-1")[:80]
    with socket.create_connection(("127.0.0.1", listening.port), timeout=10) as sock:
        sock.sendall(VT + partial)
    wait_for(
        lambda: any("closed before the end" in (r.reason or "") for r in listening.reports()),
        10,
        "the cut frame to be recorded",
    )
    with socket.create_connection(("127.0.0.1", listening.port), timeout=10) as sock:
        sock.sendall(b"not mllp at all\x1c\r")  # bytes without a start block
        assert msa(read_frame(sock))[0] == "AR"
    (ack,) = exchange(listening.port, oru(accession="ACC-GOOD"))
    assert msa(ack)[0] == "AA"


def test_nothing_is_recorded_and_ae_asks_for_a_resend_when_the_disk_is_below_the_reserve(
    listening: Listening,
) -> None:
    full = listening.settings.model_copy(update={"min_free_disk_mb": 1 << 40})
    before = len(listening.reports())
    message = oru(accession="ACC-FULL", control_id="FULL-1")

    reception = Hl7Receiver(full, listening.sessions).receive(Block(message, len(message)))

    assert msa(reception.ack)[:2] == ("AE", "FULL-1")
    assert err_code(reception.ack) == "207"
    assert len(listening.reports()) == before

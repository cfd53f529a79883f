"""HL7 v2 messages without a network: reading a RIS's ORU^R01, the ACKs, the AI draft as an
ORU^R01 (read back with python-hl7), and how the outbox reads a receiver's ACK."""

from __future__ import annotations

from datetime import datetime

import hl7
import pytest
from pydicom import Dataset

from cxrnode.hl7.message import (
    AckCode,
    ErrorCode,
    Refusal,
    build_ack,
    escape,
    parse_oru,
    parse_timestamp,
    sniff_header,
)
from cxrnode.hl7.oru import build_oru
from cxrnode.hl7.sender import classify_ack
from cxrnode.outputs.findings_sr import DRAFT_NOTICE, FINDING_CONCEPTS, STATE_VALUES
from cxrnode.uids import device_uid
from model.contracts import ModelResult

MSH = "MSH|^~\\&|RIS|HOSP|CXRNODE|HOSP|20261129120000||ORU^R01^ORU_R01|M1|P|2.5.1"
OBR_F = "OBR|1||ACC-7|71045^XR CHEST^CPT|||20261129110000" + "|" * 15 + "20261129115900+0100||RAD|F"


def message(*segments: str) -> str:
    return "\r".join([MSH, *segments]) + "\r"


def test_a_ris_report_is_read_into_status_text_accession_patient_and_time() -> None:
    text = message(
        "PID|1||PAT-9^^^HOSP~OTHER^^^X||DOE^JANE",
        "PV1|1|O",
        "ORC|RE|PLACER|ACC-7",
        OBR_F,
        "OBX|1|TX|GDT^History^L||Cough.||||||F",
        "OBX|2|FT|GDT^Findings^L||Heart size is enlarged.\\.br\\Small \\T\\ trace effusion.||||||F",
        "OBX|3|TX|IMP^Impression^L||Cardiomegaly.~No pneumothorax.||||||F",
        "OBX|4|CWE|8186001^Cardiomegaly^SCT||52101004^Present^SCT||||||F",
        "ZDS|1.2.3.4^RIS^Application^DICOM",
    )

    parsed = parse_oru(text)

    assert parsed.header.control_id == "M1" and parsed.header.sender == "RIS|HOSP"
    (group,) = parsed.groups
    assert group.result_status == "F"
    assert group.accession_number == "ACC-7"
    assert group.patient_id == "PAT-9"
    assert group.study_instance_uid == "1.2.3.4"
    assert group.observed_at == datetime(2026, 11, 29, 10, 59)  # +0100 made UTC
    assert group.text.splitlines() == [
        "History: Cough.",
        "Findings: Heart size is enlarged.",
        "Small & trace effusion.",
        "Impression: Cardiomegaly.",
        "No pneumothorax.",
    ]


def test_segment_ends_may_be_lf_or_crlf_and_the_status_may_come_from_obx_11() -> None:
    text = "\n".join([MSH, "OBR|1||ACC-1", "OBX|1|ST|x^Report^L||Lungs are clear.||||||P"]).replace(
        "\n", "\r\n"
    )
    (group,) = parse_oru(text).groups
    assert (group.result_status, group.text) == ("P", "Report: Lungs are clear.")


def test_each_order_group_is_its_own_report_and_the_accession_field_is_configurable() -> None:
    text = message(
        "PID|1||PAT-1",
        "OBR|1||F-1|||||||||||||||ACC-A" + "|" * 7 + "F",
        "OBX|1|TX|x^y||Cardiomegaly.||||||F",
        "OBR|2||F-2|||||||||||||||ACC-B" + "|" * 7 + "P",
        "OBX|1|TX|x^y||Clear lungs.||||||P",
    )
    first, second = parse_oru(text, accession_fields=["OBR-18"]).groups
    assert (first.accession_number, first.result_status, first.text) == (
        "ACC-A",
        "F",
        "Cardiomegaly.",
    )
    assert (second.accession_number, second.result_status) == ("ACC-B", "P")
    assert parse_oru(text).groups[0].accession_number == "F-1"  # default: OBR-3 first


@pytest.mark.parametrize(
    ("segments", "error", "words"),
    [
        (["PID|1||P1", "ORC|RE", "PID|2||P2", OBR_F], 100, "PID inside an order"),
        ([OBR_F, "OBX|1|TX|x||t||||||F", "PID|2||P2"], 100, "PID without an OBR"),
        (["ORC|RE", "TQ1|1", OBR_F], 100, "TQ1 between ORC and OBR"),
        (["ORC|RE", "OBX|1|TX|x||t||||||F"], 100, "OBX before any OBR"),
        (["PID|1||P1", "PV1|1"], 101, "no OBR segment"),
        ([OBR_F, "PV1|1|O", "OBX|1|TX|x||t||||||F"], 100, "PV1 outside the patient group"),
        ([OBR_F, "OBX|1|TX|x||t||||||F", "MSH|^~\\&|X"], 100, "MSH appears again"),
    ],
)
def test_segment_order_errors_are_refused_with_ar_100_or_101(
    segments: list[str], error: int, words: str
) -> None:
    with pytest.raises(Refusal) as refused:
        parse_oru(message(*segments))
    assert refused.value.ack == AckCode.AR and int(refused.value.error) == error
    assert words in refused.value.reason


def test_the_header_of_a_broken_message_is_still_read_for_its_ack() -> None:
    header = sniff_header("MSH#^~\\&#LAB#H#CX#H#2026##ORU^R01#C-9#P#2.4\rOBR#1")
    assert (header.sending_application, header.control_id, header.version) == ("LAB", "C-9", "2.4")
    assert sniff_header("garbage").control_id == ""


def test_an_ack_names_the_message_the_error_and_where_it_is() -> None:
    header = parse_oru(message(OBR_F, "OBX|1|TX|x||t||||||F")).header
    ack = build_ack(
        header,
        AckCode.AR,
        "OBX before any OBR | and more",
        error=ErrorCode.segment_sequence_error,
        location="OBX^3",
        sending_application="CXRNODE",
        now=datetime(2026, 1, 2, 3, 4, 5),
    )
    parsed = hl7.parse(ack)
    assert str(parsed.segment("MSH")(9)) == "ACK^R01^ACK"
    assert str(parsed.segment("MSH")(5)) == "RIS"  # back to the sender
    assert str(parsed.segment("MSA")(1)) == "AR" and str(parsed.segment("MSA")(2)) == "M1"
    assert parsed.unescape(str(parsed.segment("MSA")(3))) == "OBX before any OBR | and more"
    err = parsed.segment("ERR")
    assert str(err(2)) == "OBX^3" and str(err(3)).startswith("100^Segment sequence error")
    assert str(err(4)) == "E"
    assert "ERR" not in build_ack(header, AckCode.AA, "stored")


def test_escaping_and_timestamps() -> None:
    assert escape("a|b^c&d~e\\f\nnext") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f next"
    assert parse_timestamp("20261129") == datetime(2026, 11, 29)
    assert parse_timestamp("202611291230-0500") == datetime(2026, 11, 29, 17, 30)
    assert parse_timestamp("not a time") is None


# ------------------------------------------------------------------------- the draft as ORU


@pytest.fixture
def header() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.9.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9.1"
    ds.PatientName = "Doe^Jane^Q^Dr^III"
    ds.PatientID = "PAT|9"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-9"
    ds.StudyDate = "20261129"
    ds.StudyTime = "101500.25"
    return ds


@pytest.fixture
def draft() -> ModelResult:
    return ModelResult(
        report="Findings: The heart is enlarged.\nSmall right pleural effusion.\n"
        "Impression: Cardiomegaly with a small effusion.",
        differential="Congestive heart failure.",
        recommendation="Follow-up radiograph.",
        findings={
            "cardiomegaly": "present",
            "pleural_effusion": "uncertain",
            "pneumothorax": "absent",
        },
        model_id="/models/cxr-llava",
        model_hash="ab" * 32,
        pipeline_version="0.1.0",
        prompts={"report": "paediatric"},
    )


def test_the_draft_oru_is_preliminary_with_the_notice_first_and_the_sr_s_finding_codes(
    header: Dataset, draft: ModelResult
) -> None:
    built = build_oru(header, draft, version=1, made_at=datetime(2026, 11, 29, 10, 20, 30))
    message = hl7.parse(built.text)

    msh = message.segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert str(msh(10)) == built.control_id and len(built.control_id) <= 20
    assert str(msh(7)) == "20261129102030+0000" and str(msh(18)) == "UNICODE UTF-8"
    pid = message.segment("PID")
    assert message.unescape(str(pid(3)(1)(1))) == "PAT|9" and str(pid(3)(1)(4)) == "HOSP"
    assert str(pid(5)) == "Doe^Jane^Q^III^Dr"  # XPN: family, given, middle, suffix, prefix
    assert str(message.segment("OBR")(3)) == "ACC-9" and str(message.segment("OBR")(25)) == "P"
    assert str(message.segment("ZDS")(1)(1)(1)) == header.StudyInstanceUID

    observations = message.segments("OBX")
    assert all(str(obx(11)) == "P" for obx in observations)
    assert message.unescape(str(observations[0](5))) == DRAFT_NOTICE  # the notice comes first
    assert {str(obx(18)) for obx in observations} == {f"{device_uid(draft.model_hash)}^cxrnode"}
    narrative = {str(obx(3)(1)(2)): str(obx(5)) for obx in observations if str(obx(2)) == "TX"}
    assert narrative["Finding"] == "The heart is enlarged.~Small right pleural effusion."
    assert narrative["Impression"] == "Cardiomegaly with a small effusion."
    assert narrative["Recommendation"] == "Follow-up radiograph."
    coded = {
        (str(obx(3)(1)(1)), str(obx(3)(1)(3)), str(obx(5)(1)(1)), str(obx(5)(1)(3)))
        for obx in observations
        if str(obx(2)) == "CWE"
    }
    assert coded == {
        (
            FINDING_CONCEPTS[name].value,
            FINDING_CONCEPTS[name].scheme_designator,
            STATE_VALUES[state].value,
            STATE_VALUES[state].scheme_designator,
        )
        for name, state in draft.findings.items()
        if state != "not_mentioned"
    }


def test_the_draft_oru_is_the_same_message_when_rebuilt_and_a_new_one_for_a_new_version(
    header: Dataset, draft: ModelResult
) -> None:
    made = datetime(2026, 11, 29, 10, 20, 30)
    first = build_oru(header, draft, version=1, made_at=made)
    assert build_oru(header, draft, version=1, made_at=made) == first
    second = build_oru(header, draft, version=2, made_at=made)
    assert second.control_id != first.control_id and second.uid != first.uid


def test_our_draft_read_back_is_recognised_as_ours(header: Dataset, draft: ModelResult) -> None:
    built = build_oru(header, draft, version=1, made_at=datetime(2026, 11, 29))
    (group,) = parse_oru(built.text).groups
    assert "cxrnode" in group.equipment and group.result_status == "P"
    assert group.accession_number == "ACC-9"


# ------------------------------------------------------------------------- reading an ACK


def ack(code: str, control_id: str = "CXR1", text: str = "") -> bytes:
    return f"MSH|^~\\&|RIS|H|CXRNODE||2026||ACK^R01^ACK|A1|P|2.5.1\rMSA|{code}|{control_id}|{text}\r".encode()


@pytest.mark.parametrize(
    ("answer", "verdict", "status"),
    [
        (ack("AA"), "delivered", "AA"),
        (ack("CA"), "delivered", "CA"),
        (ack("AE", text="database busy"), "retry", "AE"),
        (ack("AR", text="unknown order"), "dead", "AR"),
        (ack("AA", control_id="OTHER"), "retry", "bad-ack"),
        (b"HTTP/1.1 400 Bad Request\r\n", "retry", "bad-ack"),
    ],
)
def test_the_outbox_reads_aa_as_delivered_ae_as_retry_and_ar_as_dead(
    answer: bytes, verdict: str, status: str
) -> None:
    read = classify_ack(answer, "CXR1", "mllp://ris:2575")
    assert (read.verdict, read.status) == (verdict, status)
    if status == "AR":
        assert "unknown order" in read.detail and "resend --dead" in read.detail

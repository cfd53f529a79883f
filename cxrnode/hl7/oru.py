"""The AI draft as an HL7 v2.5.1 ORU^R01, for a RIS that takes preliminary results.

The same draft as the SR, in the RIS's language. Why this shape:

- **Preliminary, and says so.** OBR-25 and every OBX-11 are ``P`` (preliminary): a RIS shows it
  as an unsigned result that the radiologist's final report (``F``) replaces. The first OBX is
  the draft notice the SR carries (:data:`~cxrnode.outputs.findings_sr.DRAFT_NOTICE`).
- **Identity.** PID copies the patient identity of the image (PID-3 with IssuerOfPatientID as
  assigning authority, PID-5 with DICOM's name components reordered for XPN, PID-7, PID-8).
  ORC-3 and OBR-3 (filler order number) carry the AccessionNumber, which is how a RIS finds
  the order; ZDS-1 (IHE Radiology) carries the Study Instance UID.
- **Narrative.** One TX OBX per section, one repetition per line, coded with the DICOM concepts
  the SR uses: Finding (DCM 121071), Impression (121073), Differential Diagnosis/Impression
  (111023), Recommendation (121075) and Comment (121106) for the notices.
- **Findings.** One CWE OBX per mentioned finding: OBX-3 the finding concept, OBX-5 the
  Present / Absent / Undetermined value, both exactly the SR's codes
  (:data:`~cxrnode.outputs.findings_sr.FINDING_CONCEPTS`,
  :data:`~cxrnode.outputs.findings_sr.STATE_VALUES`; SCT and DCM are also HL7 table 0396 coding
  system names). Unmentioned findings are left out, as in the SR.
- **The algorithm.** OBX-18 (equipment instance identifier) is the SR's Device UID with the
  namespace ``cxrnode``, so a report that comes back from the RIS is recognised as our own.
- **Priority.** A TQ1 after the OBR carries the draft's reading priority in TQ1-9 (HL7 table
  0485: ``S`` stat, ``A`` ASAP, ``R`` routine; :mod:`cxrnode.triage`), and the OBX of each
  finding that made the draft urgent has the abnormal flag ``AA`` (critically abnormal) in
  OBX-8, so a RIS can sort its worklist and highlight the finding.
- **Deterministic.** MSH-7 is when the model's result was recorded and MSH-10 derives from the
  draft's identity, so a rebuilt or re-sent draft is the same message (a receiver can drop the
  duplicate); a new version of the draft is a new message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset

from cxrnode.hl7.message import ENCODING_CHARACTERS, FIELD_SEPARATOR, escape, format_timestamp
from cxrnode.ingest.record import SourceRecord
from cxrnode.outputs.common import source_record
from cxrnode.outputs.findings_sr import (
    DRAFT_NOTICE,
    EMPTY_REPORT_NOTE,
    FINDING_CONCEPTS,
    MANUFACTURER,
    PAEDIATRIC_NOTE,
    PROCEDURE_REPORTED,
    STATE_VALUES,
)
from cxrnode.outputs.text import multi_line
from cxrnode.triage import Priority
from cxrnode.uids import device_uid, uid_from_key
from model.contracts import ModelResult

__all__ = ["VERSION", "Oru", "build_oru", "control_id"]

VERSION = "2.5.1"
RESULT_STATUS = "P"
_SECTIONS = (
    ("121071", "Finding"),
    ("121073", "Impression"),
    ("111023", "Differential Diagnosis/Impression"),
    ("121075", "Recommendation"),
)
_COMMENT = ("121106", "Comment")


@dataclass(frozen=True)
class Oru:
    """One built message: ``uid`` names it in the outbox, ``control_id`` is its MSH-10."""

    uid: str
    control_id: str
    text: str

    def encode(self) -> bytes:
        return self.text.encode("utf-8")


def control_id(uid: str) -> str:
    """MSH-10 (at most 20 characters in v2.5.1) derived from the message's UID."""
    return "CXR" + hashlib.sha1(uid.encode("ascii")).hexdigest()[:17].upper()


def _person_name(source: SourceRecord) -> str:
    """DICOM PN family^given^middle^prefix^suffix as HL7 XPN family^given^middle^suffix^prefix."""
    parts = (source.text("PatientName").split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(part.strip()) for part in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _segment(*fields: str) -> str:
    return FIELD_SEPARATOR.join(fields).rstrip(FIELD_SEPARATOR)


def _fields(name: str, values: dict[int, str]) -> str:
    """A segment from {field number: value}; fields not given are empty."""
    last = max(values)
    return _segment(name, *(values.get(n, "") for n in range(1, last + 1)))


def _lines(text: str) -> list[str]:
    """The TX repetitions of a text: its lines as every output cleans them
    (:func:`cxrnode.outputs.text.multi_line`: no TAB, control character or U+FFFD)."""
    return [escape(line) for line in multi_line(text).split("\n")]


def build_oru(
    header: SourceRecord | Dataset,
    draft: ModelResult,
    *,
    version: int,
    made_at: datetime,
    sending_application: str = "CXRNODE",
    sending_facility: str = "",
    receiving_application: str = "",
    receiving_facility: str = "",
    priority: Priority = Priority.routine,
    suspected: Sequence[str] = (),
) -> Oru:
    """Build the ORU^R01 of one draft (see the module docstring).

    Parameters
    ----------
    header
        The source image's checked record (patient and study identity, AccessionNumber),
        the one every DICOM output takes; a dataset is checked first.
    draft
        The validated draft.
    version
        The job's version (1, 2, ...): a new version is a new message.
    made_at
        When the model's result was recorded (naive UTC): MSH-7, OBR-22, OBX-14.
    priority
        The draft's reading priority (TQ1-9).
    suspected
        The findings that made the draft urgent (their OBX-8 is ``AA``).

    Raises
    ------
    ValueError
        When the header lacks the Study or SOP Instance UID the message is named by.
    """
    source = source_record(header)  # raises ValueError without the UIDs the draft is named by
    study_uid, source_uid = source.study_instance_uid, source.sop_instance_uid
    uid = uid_from_key(
        "hl7-oru", source_uid, draft.model_hash, draft.pipeline_version, str(version)
    )
    message_id = control_id(uid)
    stamp = format_timestamp(made_at)
    accession = escape(source.text("AccessionNumber"))
    patient_id = escape(source.text("PatientID"))
    issuer = escape(source.text("IssuerOfPatientID"))
    equipment = f"{device_uid(draft.model_hash)}^{MANUFACTURER}"
    study_time = source.text("StudyDate") + source.text("StudyTime").split(".")[0]

    segments = [
        _fields(  # MSH-1 is the separator itself, so key n is MSH-(n + 1)
            "MSH",
            {
                1: ENCODING_CHARACTERS,
                2: escape(sending_application),
                3: escape(sending_facility),
                4: escape(receiving_application),
                5: escape(receiving_facility),
                6: stamp,
                8: "ORU^R01^ORU_R01",
                9: message_id,
                10: "P",
                11: VERSION,
                17: "UNICODE UTF-8",
            },
        ),
        _fields(
            "PID",
            {
                1: "1",
                3: f"{patient_id}^^^{issuer}" if issuer else patient_id,
                5: _person_name(source),
                7: escape(source.text("PatientBirthDate")),
                8: escape(source.text("PatientSex")),
            },
        ),
        _fields("ORC", {1: "RE", 3: accession, 5: "CM"}),
        _fields(
            "OBR",
            {
                1: "1",
                3: accession,
                4: f"{PROCEDURE_REPORTED.value}^{escape(PROCEDURE_REPORTED.meaning)}^LN",
                7: escape(study_time),
                22: stamp,
                24: "RAD",
                25: RESULT_STATUS,
            },
        ),
        _fields("TQ1", {1: "1", 9: f"{priority.hl7}^{_PRIORITY_NAMES[priority]}^HL70485"}),
    ]
    observations = _observations(draft)
    critical = {_finding_concept(name) for name in suspected}
    for number, (value_type, concept, value) in enumerate(observations, start=1):
        segments.append(
            _fields(
                "OBX",
                {
                    1: str(number),
                    2: value_type,
                    3: concept,
                    5: value,
                    8: "AA" if concept in critical else "",
                    11: RESULT_STATUS,
                    14: stamp,
                    18: equipment,
                },
            )
        )
    segments.append(_fields("ZDS", {1: f"{study_uid}^{MANUFACTURER}^Application^DICOM"}))
    return Oru(uid, message_id, "\r".join(segments) + "\r")


_PRIORITY_NAMES = {Priority.stat: "Stat", Priority.asap: "ASAP", Priority.routine: "Routine"}


def _finding_concept(name: str) -> str:
    concept = FINDING_CONCEPTS[name]
    return _coded(concept.value, concept.meaning, concept.scheme_designator)


def _coded(code: str, meaning: str, scheme: str) -> str:
    return f"{code}^{escape(meaning)}^{scheme}"


def _observations(draft: ModelResult) -> list[tuple[str, str, str]]:
    """(value type, OBX-3, OBX-5) of each OBX, the draft notice first."""
    comment = _coded(*_COMMENT, "DCM")
    out: list[tuple[str, str, str]] = [("TX", comment, escape(DRAFT_NOTICE))]
    findings, impression = draft.sections
    texts: Sequence[str] = (findings, impression, draft.differential, draft.recommendation)
    for (code, meaning), text in zip(_SECTIONS, texts, strict=True):
        lines = _lines(text)
        if any(lines):
            out.append(("TX", _coded(code, meaning, "DCM"), "~".join(lines)))
    if draft.paediatric_prompt:
        out.append(("TX", comment, escape(PAEDIATRIC_NOTE)))
    if not multi_line(findings) and not multi_line(impression):
        out.append(("TX", comment, escape(EMPTY_REPORT_NOTE)))
    for name, state in draft.findings.items():
        if state == "not_mentioned":
            continue
        concept, value = FINDING_CONCEPTS[name], STATE_VALUES[state]
        out.append(
            (
                "CWE",
                _coded(concept.value, concept.meaning, concept.scheme_designator),
                _coded(value.value, value.meaning, value.scheme_designator),
            )
        )
    return out

"""Final reports: what both entrances (SR by C-STORE, HL7 ORU over MLLP) hand over, how a
report finds its study, and how it is recorded.

Each entrance stores the received bytes durably first (under DATA_DIR/reports), then calls
:func:`record_report` and commits, and only then answers (0x0000, or an HL7 ACK). A report
that finds no study is kept ``unmatched`` and matched later by :mod:`cxrnode.monitor.scoring`
(the images may come after the report, or never: a RIS sends reports of every modality).

Matching, in order of trust:

1. the Study Instance UID (an SR always has one; an ORU may carry it in IHE's ZDS-1);
2. the accession number, among studies recorded with it; when the report names a patient ID
   too, it must be the study's, and it decides between studies that share an accession number.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.db import (
    FinalReport,
    Instance,
    ReportSource,
    ReportState,
    ReportStatus,
    Study,
    utcnow,
)
from cxrnode.ingest.storage import is_valid_uid
from cxrnode.settings import Settings
from model.labeler import label_report_states

__all__ = [
    "IncomingReport",
    "Match",
    "find_earlier",
    "hl7_relpath",
    "match_study",
    "record_report",
    "report_relpath",
    "reports_dir",
]

_PATIENT_ID_TAG = "00100020"


def reports_dir(settings: Settings) -> Path:
    """Where received reports are kept: DATA_DIR/reports."""
    return settings.data_dir / "reports"


def report_relpath(study_uid: str, sop_instance_uid: str) -> str:
    """Where an SR lives below DATA_DIR/reports (both UIDs already checked)."""
    for value in (study_uid, sop_instance_uid):
        if not is_valid_uid(value):
            raise ValueError(f"refusing to build a path from {value!r}: not a valid DICOM UID")
    return f"sr/{study_uid}/{sop_instance_uid}.dcm"


def hl7_relpath(now: datetime) -> str:
    """Where an HL7 message lives below DATA_DIR/reports: never a name from the peer."""
    return f"hl7/{now:%Y%m%d}/{now:%H%M%S}-{uuid.uuid4().hex}.hl7"


@dataclass(frozen=True)
class IncomingReport:
    """One radiologist report as an entrance read it (before matching).

    Attributes
    ----------
    status
        The result status; ``None`` for a rejected or ignored report.
    text
        The report text the labeler reads ("" when there is none).
    message_id
        SOP Instance UID of an SR; "application|facility|MSH-10[#group]" of an HL7 report.
    """

    source: ReportSource
    state: ReportState  # matched/unmatched are decided by :func:`record_report`
    status: ReportStatus | None
    text: str
    message_id: str | None
    study_instance_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    observed_at: datetime | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.state in (ReportState.matched, ReportState.unmatched) and self.status is None:
            raise ValueError("a report to be matched needs a result status")


@dataclass(frozen=True)
class Match:
    study_id: int | None
    reason: str  # what matched, or why nothing did


def _study_patient_id(session: Session, study_id: int) -> str | None:
    header = session.scalar(
        select(Instance.header)
        .where(Instance.study_id == study_id, Instance.header.is_not(None))
        .order_by(Instance.id)
        .limit(1)
    )
    values = ((header or {}).get(_PATIENT_ID_TAG) or {}).get("Value") or []
    return (str(values[0]).strip() or None) if values else None


def match_study(
    session: Session,
    study_instance_uid: str | None,
    accession_number: str | None,
    patient_id: str | None,
) -> Match:
    """The study a report belongs to (see the module docstring), or why there is none."""
    if study_instance_uid:
        study_id = session.scalar(
            select(Study.id).where(Study.study_instance_uid == study_instance_uid)
        )
        if study_id is not None:
            return Match(study_id, "Study Instance UID")
    if not accession_number:
        return Match(None, "no study with this Study Instance UID, and no accession number")
    candidates = list(
        session.scalars(
            select(Study.id).where(Study.accession_number == accession_number).order_by(Study.id)
        )
    )
    if not candidates:
        return Match(None, "no study with this accession number yet")
    if not patient_id:
        if len(candidates) == 1:
            return Match(candidates[0], "accession number")
        return Match(None, "accession number shared by several studies and no patient ID given")
    same_patient = [s for s in candidates if _study_patient_id(session, s) in (patient_id, None)]
    if len(same_patient) == 1:
        return Match(same_patient[0], "accession number and patient ID")
    if not same_patient:
        return Match(None, "a study has this accession number but another patient ID")
    return Match(None, "accession number and patient ID shared by several studies")


def find_earlier(
    session: Session, source: ReportSource, message_id: str, *, rejected_too: bool = False
) -> FinalReport | None:
    """An earlier report with this message id: a duplicate send.

    Rejected ones count only with ``rejected_too``: an SR is the same object whenever its SOP
    Instance UID comes again, but a sender may fix a refused HL7 message and resend it under
    the same MSH-10.
    """
    query = select(FinalReport).where(
        FinalReport.source == source, FinalReport.message_id == message_id
    )
    if not rejected_too:
        query = query.where(FinalReport.state != ReportState.rejected)
    return session.scalars(query.order_by(FinalReport.id).limit(1)).first()


def record_report(
    session: Session,
    incoming: IncomingReport,
    *,
    path: str | None,
    peer: str | None,
    answer: str | None,
    now: datetime | None = None,
) -> FinalReport:
    """Add the row of a received report, matched to its study when it is to be scored, and
    labelled by the labeler; the caller commits (and answers only after that)."""
    now = now or utcnow()
    state, reason, study_id, labels = incoming.state, incoming.reason, None, None
    if state in (ReportState.matched, ReportState.unmatched):
        match = match_study(
            session,
            incoming.study_instance_uid,
            incoming.accession_number,
            incoming.patient_id,
        )
        study_id = match.study_id
        state = ReportState.matched if study_id is not None else ReportState.unmatched
        reason = f"matched by {match.reason}" if study_id is not None else match.reason
    if incoming.text.strip():
        labels = label_report_states(incoming.text)
    row = FinalReport(
        source=incoming.source,
        state=state,
        status=incoming.status,
        reason=reason,
        message_id=incoming.message_id,
        answer=answer,
        peer=(peer or "")[:100] or None,
        received_at=now,
        observed_at=incoming.observed_at,
        study_instance_uid=incoming.study_instance_uid,
        accession_number=(incoming.accession_number or "")[:64] or None,
        patient_id=(incoming.patient_id or "")[:64] or None,
        study_id=study_id,
        path=path,
        text=incoming.text or None,
        labels=labels,
    )
    session.add(row)
    session.flush()
    return row

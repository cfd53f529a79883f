"""Receive one SR by C-STORE: a radiologist's final report (or something to keep and ignore).

The SR side of the C-STORE SCP, beside :mod:`cxrnode.ingest.receive` for images, with the
same order: the file pynetdicom received is fsynced and linked into DATA_DIR/reports, its row
committed, and only then is 0x0000 sent. SRs are small, so the whole dataset is read.

What is accepted (presentation contexts in :mod:`cxrnode.net.listener`): Basic Text,
Enhanced, Comprehensive and Comprehensive 3D SR. What becomes of one:

- **Our own draft** coming back (General Equipment Manufacturer or a Device Observer
  Manufacturer ``cxrnode``, a Device Observer UID of a model that drafted this study, or an
  SOP Instance UID in our outbox): stored, recorded ``ignored``, 0x0000.
- **No report text** (no TEXT content item outside the observation context): stored,
  recorded ``rejected`` with that reason, 0x0000 (refusing would only make the PACS retry).
- **A report**: its text is the TEXT items in document order, each as "Concept name: text" so
  that the labeler sees the section headings (and drops History/Indication as it does in
  plain reports); its status comes from the flags: VERIFIED and not PRELIMINARY is final
  (corrected when it names a predecessor document), anything else preliminary. It is matched
  by Study Instance UID, else accession number (:func:`cxrnode.monitor.reports.match_study`),
  recorded ``matched`` or ``unmatched`` (matched later, when the study arrives), answered
  0x0000, and then scored when its study has a draft.
- The same SOP Instance UID again: the first copy is kept, 0x0000.
- Unreadable data 0xC000, missing or inconsistent UIDs 0xA900, disk below the reserve 0xA700,
  a database failure 0xA700: nothing is recorded and the PACS sends it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cxrnode.db import Job, Output, ReportSource, ReportState, ReportStatus, Study
from cxrnode.ingest.receive import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
    Outcome,
)
from cxrnode.ingest.storage import adopt_durably, free_bytes, is_valid_uid
from cxrnode.monitor.reports import (
    IncomingReport,
    find_earlier,
    record_report,
    report_relpath,
    reports_dir,
)
from cxrnode.monitor.scoring import score_studies
from cxrnode.settings import Settings
from cxrnode.uids import device_uid
from model.contracts import ModelResult

__all__ = [
    "REPORT_SOP_CLASSES",
    "ReportIngest",
    "is_our_draft",
    "report_status",
    "report_text",
]

log = logging.getLogger(__name__)

#: The SR storage classes a radiologist's report may come as.
REPORT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
}
OUR_MANUFACTURER = "cxrnode"
_CONTEXT_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS ACQ CONTEXT"})
_DEVICE_OBSERVER_UID = "121012"
_DEVICE_OBSERVER_MANUFACTURER = "121014"


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from _items(item)


def _concept(item: Dataset) -> tuple[str, str]:
    codes = item.get("ConceptNameCodeSequence") or []
    if not codes:
        return "", ""
    code = codes[0]
    value = str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue", ""))
    return value, str(code.get("CodeMeaning", "") or "").strip()


def report_text(ds: Dataset) -> str:
    """The report text of an SR: its TEXT items outside the observation context, in document
    order, each "Concept name: text" ("" when there are none)."""
    lines: list[str] = []

    def walk(items: list[Dataset], in_context: bool) -> None:
        for item in items:
            context = in_context or str(item.get("RelationshipType", "")) in _CONTEXT_RELATIONSHIPS
            if item.get("ValueType") == "TEXT" and not context:
                text = str(item.get("TextValue", "") or "").strip()
                if text:
                    _, meaning = _concept(item)
                    lines.append(f"{meaning}: {text}" if meaning else text)
            walk(list(item.get("ContentSequence") or []), context)

    walk(list(ds.get("ContentSequence") or []), False)
    return "\n".join(lines)


def report_status(ds: Dataset) -> ReportStatus:
    """Final when verified and not preliminary (corrected when it names a predecessor),
    otherwise preliminary."""
    verified = str(ds.get("VerificationFlag", "") or "").upper() == "VERIFIED"
    preliminary = str(ds.get("PreliminaryFlag", "") or "").upper() == "PRELIMINARY"
    partial = str(ds.get("CompletionFlag", "") or "").upper() == "PARTIAL"
    if not verified or preliminary or partial:
        return ReportStatus.preliminary
    if ds.get("PredecessorDocumentsSequence"):
        return ReportStatus.corrected
    return ReportStatus.final


def _device_observers(ds: Dataset) -> tuple[set[str], set[str]]:
    uids, manufacturers = set(), set()
    for item in _items(ds):
        code, _ = _concept(item)
        if code == _DEVICE_OBSERVER_UID and item.get("UID"):
            uids.add(str(item.UID))
        elif code == _DEVICE_OBSERVER_MANUFACTURER and item.get("TextValue"):
            manufacturers.add(str(item.TextValue).strip().lower())
    return uids, manufacturers


def is_our_draft(ds: Dataset, model_hashes: set[str], output_uids: set[str]) -> bool:
    """Whether an SR is one of our drafts: by manufacturer, Device Observer, or SOP Instance
    UID (``model_hashes``: models that drafted the study; ``output_uids``: our outbox's
    SOP Instance UIDs of the study that match this SR)."""
    if str(ds.get("Manufacturer", "") or "").strip().lower() == OUR_MANUFACTURER:
        return True
    uids, manufacturers = _device_observers(ds)
    if OUR_MANUFACTURER in manufacturers:
        return True
    if uids & {device_uid(model_hash) for model_hash in model_hashes}:
        return True
    return str(ds.get("SOPInstanceUID", "")) in output_uids


def _observed_at(ds: Dataset) -> datetime | None:
    date = str(ds.get("ContentDate", "") or "").strip()
    time = str(ds.get("ContentTime", "") or "").strip().split(".")[0].ljust(6, "0")[:6]
    try:
        return datetime.strptime(date + (time or "000000"), "%Y%m%d%H%M%S")
    except ValueError:
        return None


class ReportIngest:
    """Stores and records received SRs for one listener process."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.reserve_bytes = settings.min_free_disk_mb * 1024 * 1024

    def _ours(self, ds: Dataset) -> bool:
        study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        with self.sessions() as session:
            results = session.scalars(
                select(Job.result)
                .join(Study, Job.study_id == Study.id)
                .where(Study.study_instance_uid == study_uid, Job.result.is_not(None))
            )
            hashes = {ModelResult.from_dict(result).model_hash for result in results if result}
            sent = set(
                session.scalars(
                    select(Output.sop_instance_uid).where(Output.sop_instance_uid == sop_uid)
                )
            )
            session.rollback()
        return is_our_draft(ds, hashes, sent)

    def receive_file(
        self,
        path: Path,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_aet: str,
        peer_host: str | None,
    ) -> Outcome:
        """Handle one SR C-STORE already received into the Part-10 file ``path``; never
        raises for bad input, always returns a status (see the module docstring)."""
        if free_bytes(self.settings.data_dir) < self.reserve_bytes:
            log.warning("free space below the reserve: answering 0xA700 (sop=%s)", sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, "free disk space below the configured reserve")
        try:
            ds = pydicom.dcmread(path)
            ds.get("ContentSequence")  # parse the content tree now, while we can refuse it
        except Exception as exc:  # pydicom raises many types for broken encodings
            log.warning("refused SR from %s: 0xC000 %s", calling_aet, exc)
            return Outcome(CANNOT_UNDERSTAND, f"SR cannot be parsed: {type(exc).__name__}")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        for name, value in (
            ("SOP Instance UID", str(ds.get("SOPInstanceUID", "") or "")),
            ("Study Instance UID", study_uid),
            ("Series Instance UID", str(ds.get("SeriesInstanceUID", "") or "")),
        ):
            if not is_valid_uid(value):
                return Outcome(DOES_NOT_MATCH_SOP_CLASS, f"{name} missing or not a valid UID")
        if ds.SOPInstanceUID != sop_instance_uid or ds.get("SOPClassUID") != sop_class_uid:
            return Outcome(
                DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class/Instance UID in the dataset differ from the C-STORE request",
            )
        try:
            with self.sessions() as session:
                earlier = find_earlier(
                    session, ReportSource.dicom, sop_instance_uid, rejected_too=True
                )
                earlier_id = None if earlier is None else earlier.id
                session.rollback()
            if earlier_id is not None:
                log.info("duplicate SR %s kept as first received", sop_instance_uid)
                return Outcome(SUCCESS, "duplicate: first copy kept", earlier_id, duplicate=True)
            incoming = self._incoming(ds)
        except Exception as exc:
            log.exception("cannot check SR %s", sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, f"database unavailable: {type(exc).__name__}")

        relpath = report_relpath(study_uid, sop_instance_uid)
        try:
            size = adopt_durably(path, reports_dir(self.settings) / relpath, self.settings.tmp_dir)
        except OSError as exc:
            log.error("cannot write SR %s: %s", sop_instance_uid, exc)
            return Outcome(OUT_OF_RESOURCES, f"cannot write to storage: {exc.strerror}")
        try:
            with self.sessions() as session:
                row = record_report(
                    session,
                    incoming,
                    path=relpath,
                    peer=f"{calling_aet}@{peer_host}" if peer_host else calling_aet,
                    answer="0x0000",
                )
                report_id, study_id, state = row.id, row.study_id, row.state
                session.commit()
        except Exception as exc:
            log.exception("cannot record SR %s", sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, f"database unavailable: {type(exc).__name__}")
        log.info(
            "SR %s (%s) from %s: %s, report %d",
            sop_instance_uid,
            REPORT_SOP_CLASSES.get(sop_class_uid, sop_class_uid),
            calling_aet,
            state.value,
            report_id,
        )
        if state == ReportState.matched and study_id is not None:
            score_studies(self.sessions, [study_id])
        return Outcome(SUCCESS, None, report_id, False, size)

    def _incoming(self, ds: Dataset) -> IncomingReport:
        common = dict(
            source=ReportSource.dicom,
            message_id=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            accession_number=str(ds.get("AccessionNumber", "") or "").strip() or None,
            patient_id=str(ds.get("PatientID", "") or "").strip() or None,
            observed_at=_observed_at(ds),
        )
        text = report_text(ds)
        if self._ours(ds):
            why = "our own AI draft (manufacturer / Device Observer cxrnode); not a radiologist's report"
            return IncomingReport(
                state=ReportState.ignored, status=None, text=text, reason=why, **common
            )
        if not text.strip():
            why = "the SR has no TEXT content item: no report text to compare with the draft"
            return IncomingReport(
                state=ReportState.rejected, status=None, text="", reason=why, **common
            )
        return IncomingReport(
            state=ReportState.unmatched, status=report_status(ds), text=text, **common
        )

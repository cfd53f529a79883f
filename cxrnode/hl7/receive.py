"""Receive one HL7 message: store it durably, read it, record it, say which ACK to send.

The plain-function core of the MLLP listener (:mod:`cxrnode.hl7.listener` is the network
adapter), as :mod:`cxrnode.ingest.receive` is for C-STORE. The order is the node's first
invariant: the message bytes are written to DATA_DIR/reports/hl7 and fsynced, the rows are
committed, and only then is the ACK sent. Every message that reaches this point is kept and
recorded, the broken ones included (state ``rejected`` with the reason the ACK gives); only
when nothing can be stored (disk below the reserve, storage or database failing) is the
answer AE with nothing recorded, so that the sender keeps the message and tries again.

Each order group of an ORU^R01 is one report (see :mod:`cxrnode.hl7.message`):

- result status (OBR-25) F final, C corrected, P/R/A preliminary, X cancelled; other statuses
  carry no report and are recorded as ``ignored``;
- a group whose OBX-18 names ``cxrnode`` is our own draft coming back: ``ignored``;
- a group without report text is ``rejected`` (AR);
- the same message (sending application, facility and MSH-10) again is answered AA and not
  recorded twice;
- the rest is matched to its study (:func:`cxrnode.monitor.reports.record_report`): matched
  or, when no study has its accession number yet, ``unmatched`` and answered AA all the same
  (it is kept, and matched when the study arrives).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from cxrnode.db import ReportSource, ReportState, ReportStatus, utcnow
from cxrnode.hl7.message import (
    AckCode,
    ErrorCode,
    MessageHeader,
    Refusal,
    ResultGroup,
    build_ack,
    decode,
    parse_oru,
    sniff_header,
)
from cxrnode.hl7.mllp import Block
from cxrnode.ingest.storage import free_bytes, write_durably
from cxrnode.monitor.reports import (
    IncomingReport,
    find_earlier,
    hl7_relpath,
    record_report,
    reports_dir,
)
from cxrnode.settings import Settings

__all__ = ["STATUSES", "Hl7Receiver", "Reception"]

log = logging.getLogger(__name__)

#: OBR-25 result status -> the report's status (HL7 table 0123)
STATUSES = {
    "F": ReportStatus.final,
    "C": ReportStatus.corrected,
    "P": ReportStatus.preliminary,
    "R": ReportStatus.preliminary,
    "A": ReportStatus.preliminary,
    "X": ReportStatus.cancelled,
}


@dataclass(frozen=True)
class Reception:
    """The answer to one message and what it recorded."""

    ack: bytes
    code: AckCode
    reason: str
    report_ids: tuple[int, ...] = ()
    study_ids: tuple[int, ...] = ()  # studies to score now


@dataclass(frozen=True)
class _Verdict:
    incoming: IncomingReport
    code: AckCode
    error: ErrorCode | None = None
    location: str = ""


class Hl7Receiver:
    """Stores and records HL7 messages for the MLLP listener."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.reserve_bytes = settings.min_free_disk_mb * 1024 * 1024

    def _ack(
        self,
        header: MessageHeader,
        code: AckCode,
        reason: str,
        error: ErrorCode | None = None,
        location: str = "",
    ) -> bytes:
        return build_ack(
            header,
            code,
            reason,
            error=error,
            location=location,
            sending_application=self.settings.hl7_sending_application,
            sending_facility=self.settings.hl7_sending_facility,
        ).encode("utf-8")

    def receive(self, block: Block, peer: str | None = None) -> Reception:
        """Handle one framed message; never raises for bad input."""
        now = utcnow()
        text = decode(block.data, sniff_header(decode(block.data)).charset)
        header = sniff_header(text)
        if free_bytes(self.settings.data_dir) < self.reserve_bytes:
            reason = "free disk space below the reserve; send the message again later"
            log.warning("HL7 message %r from %s: AE, %s", header.control_id, peer, reason)
            return self._reception(header, AckCode.AE, reason, ErrorCode.application_internal_error)
        relpath = hl7_relpath(now)
        try:
            write_durably(reports_dir(self.settings) / relpath, [block.data], self.settings.tmp_dir)
        except OSError as exc:
            reason = f"cannot store the message ({exc.strerror}); send it again later"
            log.error("HL7 message %r from %s: AE, %s", header.control_id, peer, reason)
            return self._reception(header, AckCode.AE, reason, ErrorCode.application_internal_error)

        verdicts = self._verdicts(block, text)
        try:
            with self.sessions() as session:
                ids, studies, reasons = [], [], []
                for verdict in verdicts:
                    incoming = verdict.incoming
                    if verdict.code == AckCode.AA and incoming.message_id is not None:
                        earlier = find_earlier(session, ReportSource.hl7, incoming.message_id)
                        if earlier is not None:
                            reasons.append(f"duplicate of report {earlier.id}, already stored")
                            continue
                    row = record_report(
                        session,
                        incoming,
                        path=relpath,
                        peer=peer,
                        answer=verdict.code.value,
                        now=now,
                    )
                    ids.append(row.id)
                    if row.study_id is not None and row.state == ReportState.matched:
                        studies.append(row.study_id)
                    reasons.append(_said(row.state, row.reason))
                session.commit()
        except Exception as exc:
            log.exception("HL7 message %r from %s cannot be recorded", header.control_id, peer)
            reason = f"cannot record the message ({type(exc).__name__}); send it again later"
            return self._reception(header, AckCode.AE, reason, ErrorCode.application_internal_error)

        worst = next((v for v in verdicts if v.code != AckCode.AA), None)
        code = worst.code if worst is not None else AckCode.AA
        reason = "; ".join(dict.fromkeys(reasons)) or "stored"
        if worst is not None:
            reason = worst.incoming.reason or reason
        log.info(
            "HL7 message %r from %s: %s (%d report rows: %s)",
            header.control_id,
            peer,
            code.value,
            len(ids),
            reason,
        )
        ack = self._ack(
            header,
            code,
            reason,
            worst.error if worst is not None else None,
            worst.location if worst is not None else "",
        )
        return Reception(ack, code, reason, tuple(ids), tuple(dict.fromkeys(studies)))

    def _reception(
        self, header: MessageHeader, code: AckCode, reason: str, error: ErrorCode
    ) -> Reception:
        return Reception(self._ack(header, code, reason, error), code, reason)

    def _verdicts(self, block: Block, text: str) -> list[_Verdict]:
        """What to record for each report of the message (one rejected row for a message
        that cannot be read at all)."""
        try:
            if not block.framed:
                raise Refusal(
                    "the bytes are not an MLLP frame (no <VT> start block)",
                    ErrorCode.data_type_error,
                )
            if not block.complete:
                raise Refusal(
                    "the connection closed before the end of the frame",
                    ErrorCode.data_type_error,
                )
            if block.oversize:
                raise Refusal(
                    f"the message has {block.size} bytes, more than HL7_MAX_MESSAGE_BYTES "
                    f"({self.settings.hl7_max_message_bytes}); only its start is kept",
                    ErrorCode.application_internal_error,
                )
            message = parse_oru(text, self.settings.hl7_accession_fields)
        except Refusal as refusal:
            header = sniff_header(text)
            rejected = IncomingReport(
                source=ReportSource.hl7,
                state=ReportState.rejected,
                status=None,
                text="",
                message_id=f"{header.sender}|{header.control_id}"[:300]
                if header.control_id
                else None,
                reason=refusal.reason,
            )
            return [_Verdict(rejected, refusal.ack, refusal.error, refusal.location)]
        several = len(message.groups) > 1
        return [self._group_verdict(message.header, group, several) for group in message.groups]

    def _group_verdict(self, header: MessageHeader, group: ResultGroup, several: bool) -> _Verdict:
        message_id = f"{header.sender}|{header.control_id}"[:290]
        if several:
            message_id += f"#{group.index}"
        status = STATUSES.get(group.result_status)
        fields = dict(
            source=ReportSource.hl7,
            text=group.text,
            message_id=message_id,
            study_instance_uid=group.study_instance_uid[:64] or None,
            accession_number=group.accession_number or None,
            patient_id=group.patient_id or None,
            observed_at=group.observed_at,
        )
        if "cxrnode" in group.equipment:
            ours = "our own AI draft (OBX-18 names cxrnode); not a radiologist's report"
            return _Verdict(
                IncomingReport(state=ReportState.ignored, status=status, reason=ours, **fields),
                AckCode.AA,
            )
        if status is None:
            why = f"result status {group.result_status!r} carries no report; not scored"
            return _Verdict(
                IncomingReport(state=ReportState.ignored, status=None, reason=why, **fields),
                AckCode.AA,
            )
        if status != ReportStatus.cancelled and not group.text.strip():
            why = f"order group {group.index} has no report text (TX, FT, ST or CF OBX)"
            return _Verdict(
                IncomingReport(state=ReportState.rejected, status=status, reason=why, **fields),
                AckCode.AR,
                ErrorCode.required_field_missing,
                f"OBX^{group.index}^5",
            )
        return _Verdict(
            IncomingReport(state=ReportState.unmatched, status=status, **fields), AckCode.AA
        )


def _said(state: ReportState, reason: str | None) -> str:
    if state == ReportState.matched:
        return f"stored; {reason}"
    if state == ReportState.unmatched:
        return f"stored; {reason} (it is matched when the study arrives)"
    return f"stored; {reason or state.value}"

"""HL7 v2 messages: reading an incoming ORU^R01 report, writing ACKs, escaping values.

Pure functions over text (no network, no database), on top of python-hl7's parser.

What an incoming message must be, and the acknowledgement when it is not (HL7 v2.5 2.9.2,
original mode; error codes from HL7 table 0357). We use AR for anything that resending the
same message cannot fix and AE for a failure of ours that a resend can (storage or database),
the same meaning our own outbox gives them (AE retried, AR dead):

===============================================  ====  ===========================
problem                                          ACK   ERR-3
===============================================  ====  ===========================
not starting with MSH, MSH repeated              AR    100 segment sequence error
field separator not ``|`` or encoding characters AR    102 data type error
other than ``^~\\&``
MSH-10 (message control ID) empty                AR    101 required field missing
MSH-9 not ORU^R01                                AR    200 / 201 unsupported type / event
MSH-11 processing ID not P                       AR    202 unsupported processing id
MSH-12 version not 2.x                           AR    203 unsupported version id
OBX before any OBR, ORC not followed by OBR,     AR    100 segment sequence error
PID/PV1 inside an order, no OBR at all
OBR-25 (and OBX-11) result status missing        AR    101 required field missing
no report text (TX, FT, ST, CF OBX) in a group   AR    101 required field missing
larger than HL7_MAX_MESSAGE_BYTES                AR    207 application internal error
cannot store or record it                        AE    207 application internal error
===============================================  ====  ===========================

A message may hold several order groups (OBR with its OBX); each is one report. The text of a
group is its text OBX values in order, one line per OBX and per repetition, FT formatting
turned into line breaks; an OBX-3 naming a report section (Findings, Impression, History...)
is written as a heading, so the labeler drops history sections as it does in plain reports.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import hl7

from cxrnode.outputs.text import sanitise

__all__ = [
    "ENCODING_CHARACTERS",
    "FIELD_SEPARATOR",
    "AckCode",
    "ErrorCode",
    "MessageHeader",
    "OruMessage",
    "Refusal",
    "ResultGroup",
    "build_ack",
    "decode",
    "escape",
    "format_timestamp",
    "parse_oru",
    "parse_timestamp",
    "sniff_header",
]

FIELD_SEPARATOR = "|"
ENCODING_CHARACTERS = "^~\\&"
SEGMENT_END = "\r"
ACK_TEXT_LENGTH = 80  # MSA-3 is ST(80) in v2.5


class AckCode(enum.StrEnum):
    AA = "AA"  # accepted
    AE = "AE"  # error: resend may succeed
    AR = "AR"  # rejected: resending the same message will not help


class ErrorCode(enum.IntEnum):
    """HL7 table 0357 (message error condition codes) used here."""

    segment_sequence_error = 100
    required_field_missing = 101
    data_type_error = 102
    unsupported_message_type = 200
    unsupported_event_code = 201
    unsupported_processing_id = 202
    unsupported_version_id = 203
    application_internal_error = 207


_ERROR_TEXT = {
    ErrorCode.segment_sequence_error: "Segment sequence error",
    ErrorCode.required_field_missing: "Required field missing",
    ErrorCode.data_type_error: "Data type error",
    ErrorCode.unsupported_message_type: "Unsupported message type",
    ErrorCode.unsupported_event_code: "Unsupported event code",
    ErrorCode.unsupported_processing_id: "Unsupported processing id",
    ErrorCode.unsupported_version_id: "Unsupported version id",
    ErrorCode.application_internal_error: "Application internal error",
}


class Refusal(Exception):
    """A message (or a group of it) we do not take; ``ack`` and ``error`` say how to answer."""

    def __init__(
        self, reason: str, error: ErrorCode, ack: AckCode = AckCode.AR, location: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.ack = ack
        self.location = location


# --------------------------------------------------------------------------------- escaping

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(value: str) -> str:
    """A text value made safe for one HL7 component: the text every output gets
    (:func:`cxrnode.outputs.text.sanitise`: TAB as a space, no control character, no
    U+FFFD), line breaks as spaces, then the delimiters escaped (HL7 2.7.4). Split lines
    before escaping."""
    value = sanitise(value).replace("\n", " ")
    for raw, escaped in _ESCAPES:
        value = value.replace(raw, escaped)
    return value


def format_timestamp(moment: datetime) -> str:
    """HL7 DTM with an explicit offset; naive datetimes are UTC (as the database keeps them)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?$")


def parse_timestamp(text: str) -> datetime | None:
    """An HL7 DTM/TS as naive UTC (no offset: taken as UTC); None when it does not parse."""
    match = _DTM.match(text.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        moment = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
        )
    except ValueError:
        return None
    if offset:
        sign = 1 if offset[0] == "+" else -1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
        moment = moment.replace(tzinfo=timezone(sign * delta)).astimezone(UTC)
        moment = moment.replace(tzinfo=None)
    return moment


# ----------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class MessageHeader:
    """What an ACK needs from a message's MSH, read even from a broken message."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    message_code: str = ""
    trigger_event: str = ""
    processing_id: str = ""
    version: str = ""
    charset: str = ""

    @property
    def sender(self) -> str:
        return f"{self.sending_application}|{self.sending_facility}"


def decode(raw: bytes, charset: str = "") -> str:
    """Message bytes as text: UTF-8 when MSH-18 says so or the bytes are UTF-8, else Latin-1
    (8859/1, the usual non-ASCII set of v2 senders)."""
    if charset.strip().upper() in ("8859/1", "ISO_IR 100"):
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _component(field_text: str, index: int = 1, separator: str = "^") -> str:
    parts = field_text.split(separator)
    return parts[index - 1].strip() if len(parts) >= index else ""


def sniff_header(text: str) -> MessageHeader:
    """The MSH fields of ``text``, read by position with the message's own separators; empty
    fields when there is no MSH. Never raises: an ACK needs what can be read."""
    first = text.lstrip()[: 64 * 1024].split("\r", 1)[0].split("\n", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return MessageHeader()
    separator = first[3]
    fields = first.split(separator)  # fields[1] is MSH-2, fields[n - 1] is MSH-n
    component = fields[1][:1] if len(fields) > 1 and fields[1] else "^"

    def msh(n: int) -> str:
        return fields[n - 1].strip() if len(fields) >= n else ""

    message_type = msh(9)
    return MessageHeader(
        sending_application=_component(msh(3), 1, component),
        sending_facility=_component(msh(4), 1, component),
        receiving_application=_component(msh(5), 1, component),
        receiving_facility=_component(msh(6), 1, component),
        control_id=msh(10),
        message_code=_component(message_type, 1, component),
        trigger_event=_component(message_type, 2, component),
        processing_id=_component(msh(11), 1, component),
        version=_component(msh(12), 1, component),
        charset=msh(18).split("~")[0],
    )


# ---------------------------------------------------------------------------- the ORU message


@dataclass(frozen=True)
class ResultGroup:
    """One order group (OBR and its OBX) of an ORU: one report.

    ``result_status`` is OBR-25 (else the first text OBX-11), e.g. "F"; ``equipment`` the
    OBX-18 namespaces (our drafts say "cxrnode" there).
    """

    index: int
    result_status: str
    text: str
    accession_number: str = ""
    patient_id: str = ""
    study_instance_uid: str = ""
    observed_at: datetime | None = None
    equipment: tuple[str, ...] = ()


@dataclass(frozen=True)
class OruMessage:
    header: MessageHeader
    groups: tuple[ResultGroup, ...] = field(default_factory=tuple)


_TEXT_TYPES = frozenset({"TX", "FT", "ST", "CF"})
_PATIENT_SEGMENTS = frozenset({"PD1", "NK1", "PV1", "PV2", "ARV"})
_SECTION_NAME = re.compile(
    r"^(findings?|impressions?|conclusions?|history|clinical (?:history|information)|"
    r"indications?|comparisons?|technique|recommendations?|report|addendum)$",
    re.IGNORECASE,
)
_FT_FORMATTING = re.compile(r"\\\.(?:br|sp\d*|in[+-]?\d*|ti[+-]?\d*|ce|fi|nf|sk\d*)\\", re.I)


def _field(segment: object, n: int) -> str:
    try:
        return str(segment(n))  # type: ignore[operator]
    except IndexError:
        return ""


def _require(condition: bool, reason: str, error: ErrorCode, location: str = "") -> None:
    if not condition:
        raise Refusal(reason, error, AckCode.AR, location)


def _check_msh(text: str) -> MessageHeader:
    _require(
        text.startswith("MSH"),
        "the message does not start with an MSH segment",
        ErrorCode.segment_sequence_error,
        "MSH",
    )
    _require(
        text[3:4] == FIELD_SEPARATOR,
        f"the field separator (MSH-1) is {text[3:4]!r}, expected '|'",
        ErrorCode.data_type_error,
        "MSH^1^1",
    )
    encoding = text[4:].split(FIELD_SEPARATOR, 1)[0]
    _require(
        encoding in (ENCODING_CHARACTERS, ENCODING_CHARACTERS + "#"),
        f"the encoding characters (MSH-2) are {encoding!r}, expected '^~\\&'",
        ErrorCode.data_type_error,
        "MSH^1^2",
    )
    header = sniff_header(text)
    _require(
        bool(header.control_id),
        "MSH-10 (message control ID) is empty",
        ErrorCode.required_field_missing,
        "MSH^1^10",
    )
    _require(
        header.message_code == "ORU",
        f"message type {header.message_code or '(empty)'} is not ORU; this listener takes "
        "ORU^R01 results",
        ErrorCode.unsupported_message_type,
        "MSH^1^9",
    )
    _require(
        header.trigger_event == "R01",
        f"trigger event {header.trigger_event or '(empty)'} is not R01",
        ErrorCode.unsupported_event_code,
        "MSH^1^9",
    )
    _require(
        header.processing_id == "P",
        f"processing ID {header.processing_id or '(empty)'} is not P (production)",
        ErrorCode.unsupported_processing_id,
        "MSH^1^11",
    )
    _require(
        header.version.startswith("2."),
        f"version {header.version or '(empty)'} is not HL7 v2",
        ErrorCode.unsupported_version_id,
        "MSH^1^12",
    )
    return header


def _check_order(names: Sequence[str]) -> None:
    """The segment order of ORU^R01 that matters here (Z-segments and others are skipped)."""
    state = "header"  # header -> patient -> order -> request -> observation
    pid_open = False  # a PID not yet followed by its OBR
    for position, name in enumerate(names, start=1):
        where = f"{name}^{position}"
        if name == "MSH":
            _require(position == 1, "MSH appears again", ErrorCode.segment_sequence_error, where)
        elif name == "PID":
            _require(
                state in ("header", "request", "observation") and not pid_open,
                "PID inside an order group (a patient must come before its orders)",
                ErrorCode.segment_sequence_error,
                where,
            )
            state, pid_open = "patient", True
        elif name in _PATIENT_SEGMENTS:
            _require(
                state == "patient",
                f"{name} outside the patient group (it must follow PID, before the orders)",
                ErrorCode.segment_sequence_error,
                where,
            )
        elif name == "ORC":
            _require(
                state != "order",
                "ORC follows ORC without an OBR",
                ErrorCode.segment_sequence_error,
                where,
            )
            state = "order"
        elif name == "OBR":
            state, pid_open = "request", False
        elif name == "OBX":
            _require(
                state in ("request", "observation"),
                "OBX before any OBR (results must follow their observation request)",
                ErrorCode.segment_sequence_error,
                where,
            )
            state = "observation"
        elif name == "SFT":
            _require(
                state == "header",
                "SFT after the header",
                ErrorCode.segment_sequence_error,
                where,
            )
        elif state == "order" and name != "NTE" and not name.startswith("Z"):
            raise Refusal(
                f"{name} between ORC and OBR", ErrorCode.segment_sequence_error, AckCode.AR, where
            )
    _require(state != "order", "ORC without an OBR", ErrorCode.segment_sequence_error)
    _require("OBR" in names, "no OBR segment", ErrorCode.required_field_missing, "OBR")
    _require(not pid_open, "PID without an OBR after it", ErrorCode.segment_sequence_error)


def _text_lines(message: hl7.Message, obx: object) -> list[str]:
    value_type = _field(obx, 2).strip().upper()
    if value_type not in _TEXT_TYPES:
        return []
    raw = _field(obx, 5)
    lines: list[str] = []
    for repetition in raw.split("~"):
        if value_type == "CF":  # coded with formatted text: the text is the second component
            repetition = _component(repetition, 2)
        repetition = _FT_FORMATTING.sub("\n", repetition)
        text = message.unescape(repetition) if "\\" in repetition else repetition
        lines.extend(line.rstrip() for line in text.replace("\r", "\n").split("\n"))
    heading = _component(_field(obx, 3), 2) or _component(_field(obx, 3), 1)
    if _SECTION_NAME.match(heading.strip()) and any(line.strip() for line in lines):
        lines[0] = f"{heading.strip()}: {lines[0].lstrip()}"
    return lines


def _accession(segments: dict[str, object], fields: Sequence[str]) -> str:
    for name in fields:
        segment_id, _, number = name.partition("-")
        segment = segments.get(segment_id)
        if segment is None:
            continue
        value = _component(_field(segment, int(number)))
        if value:
            return value
    return ""


def parse_oru(text: str, accession_fields: Sequence[str] = ("OBR-3", "OBR-18")) -> OruMessage:
    """Read an ORU^R01 into its reports, or raise :class:`Refusal` (see the module docstring).

    ``text`` is the decoded message; segment ends may be CR, LF or CRLF.
    """
    text = text.lstrip("\r\n\t ").replace("\r\n", "\r").replace("\n", "\r")
    header = _check_msh(text)
    try:
        message = hl7.parse(text.rstrip("\r"))
    except Exception as exc:  # python-hl7 raises several types for broken structure
        raise Refusal(
            f"the message cannot be parsed: {exc}", ErrorCode.data_type_error, AckCode.AR
        ) from exc
    segments = [segment for segment in message if str(segment[0]).strip()]
    names = [str(segment[0]).strip().upper() for segment in segments]
    _check_order(names)

    groups: list[ResultGroup] = []
    current: dict[str, object] = {}
    patient_id = ""
    study_uid = ""
    pending_orc: object | None = None
    obx_list: list[object] = []

    def plain(value: str) -> str:
        return message.unescape(value).strip() if "\\" in value else value

    def close_group() -> None:
        if "OBR" not in current:
            return
        obr = current["OBR"]
        lines = [line for obx in obx_list for line in _text_lines(message, obx)]
        status = _component(_field(obr, 25)).upper()
        if not status:
            status = next(
                (
                    _component(_field(obx, 11)).upper()
                    for obx in obx_list
                    if _field(obx, 2).strip().upper() in _TEXT_TYPES and _field(obx, 11).strip()
                ),
                "",
            )
        index = len(groups) + 1
        _require(
            bool(status),
            f"order group {index}: OBR-25 (result status) is empty and no OBX-11 gives one",
            ErrorCode.required_field_missing,
            f"OBR^{index}^25",
        )
        observed = parse_timestamp(_component(_field(obr, 22))) or parse_timestamp(
            _component(_field(obr, 7))
        )
        groups.append(
            ResultGroup(
                index=index,
                result_status=status,
                text="\n".join(lines).strip(),
                accession_number=plain(_accession(current, accession_fields)),
                patient_id=plain(patient_id),
                study_instance_uid=plain(study_uid),
                observed_at=observed,
                equipment=tuple(
                    _component(_field(obx, 18), 2).lower() for obx in obx_list if _field(obx, 18)
                ),
            )
        )

    for name, segment in zip(names, segments, strict=True):
        if name == "PID":
            close_group()
            current, obx_list, study_uid = {}, [], ""
            patient_id = _component(_field(segment, 3).split("~")[0])
        elif name == "ORC":
            close_group()
            current, obx_list, study_uid = {}, [], ""
            pending_orc = segment
        elif name == "OBR":
            if "OBR" in current:
                close_group()
                current, obx_list, study_uid = {}, [], ""
            if pending_orc is not None:
                current["ORC"] = pending_orc
                pending_orc = None
            current["OBR"] = segment
        elif name == "OBX":
            obx_list.append(segment)
        elif name == "ZDS":  # IHE: Study Instance UID of the order
            study_uid = _component(_field(segment, 1))
    close_group()
    return OruMessage(header, tuple(groups))


# ------------------------------------------------------------------------------------- ACK


def build_ack(
    header: MessageHeader,
    code: AckCode,
    text: str = "",
    *,
    error: ErrorCode | None = None,
    location: str = "",
    sending_application: str = "CXRNODE",
    sending_facility: str = "",
    now: datetime | None = None,
) -> str:
    """An original-mode ACK answering ``header``'s message: MSH, MSA (and ERR for AE/AR).

    ``text`` goes into MSA-3 (cut to 80 characters) and in full into ERR-8.
    """
    now = now or datetime.now(UTC)
    trigger = escape(header.trigger_event) if header.trigger_event else ""
    version = header.version if re.fullmatch(r"2\.\d+(\.\d+)?", header.version) else "2.5.1"
    msh = [
        "MSH",
        ENCODING_CHARACTERS,
        escape(sending_application),
        escape(sending_facility),
        escape(header.sending_application),
        escape(header.sending_facility),
        format_timestamp(now),
        "",
        f"ACK^{trigger}^ACK" if trigger else "ACK",
        "A" + uuid.uuid4().hex[:19].upper(),
        "P",
        version,
    ]
    segments = [
        FIELD_SEPARATOR.join(msh),
        FIELD_SEPARATOR.join(
            ["MSA", code.value, escape(header.control_id), escape(text)[:ACK_TEXT_LENGTH]]
        ),
    ]
    if code != AckCode.AA:
        error = error or ErrorCode.application_internal_error
        segments.append(
            FIELD_SEPARATOR.join(
                [
                    "ERR",
                    "",
                    location,  # ERL: segment^sequence^field, written by us
                    f"{int(error)}^{_ERROR_TEXT[error]}^HL70357",
                    "E",
                    "",
                    "",
                    "",
                    escape(text),
                ]
            )
        )
    return SEGMENT_END.join(segments) + SEGMENT_END

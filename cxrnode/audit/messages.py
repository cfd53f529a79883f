"""DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA schema), one builder per event.

Every message has the same four parts, in the schema's order:

- ``EventIdentification``: ``EventID`` (a code of CID 400, coding scheme DCM, e.g.
  ``csd-code="110114"`` User Authentication), optional ``EventTypeCode`` (CID 401, e.g. 110122
  Login), ``EventActionCode`` (C/R/U/D/E), ``EventDateTime`` (UTC, ISO 8601) and
  ``EventOutcomeIndicator`` (0 success, 4 minor failure, 8 serious failure, 12 major failure),
  with ``EventOutcomeDescription`` saying why when it is not 0;
- ``ActiveParticipant``: who: a person (user name), a service account (token name) or a DICOM
  application (AE title), with ``UserIsRequestor`` and ``NetworkAccessPointID`` (the host,
  type code 2 for an IP address, 1 for a machine name); the node itself takes part as the
  application (its AE title, ``AlternativeUserID`` the process id);
- ``AuditSourceIdentification``: the node (``AuditSourceID`` = AE title @ host name) with
  ``AuditSourceTypeCode`` 4 (application server process);
- ``ParticipantObjectIdentification``: what: the study (type 2 system object, role 3 report,
  ID type 110180 Study Instance UID) and the patient (type 1 person, role 1 patient, ID type
  2 "Patient Number"), as PS3.15 A.5.3 asks for the events that touch patient data; a query
  names its parameters (role 24 query, ID type 110181 SOP Class UID, the query text base64 in
  ``ParticipantObjectQuery``); a security alert names the node (role 13 security resource).

Builders return :class:`AuditMessage`; :meth:`AuditMessage.xml` is a single line of XML (no
line breaks inside), so an audit file holds one message a line and a reader never needs to
parse XML to split them.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import os
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime


class Event(enum.Enum):
    """CID 400 Audit Event ID: (code, meaning)."""

    APPLICATION_ACTIVITY = ("110100", "Application Activity")
    BEGIN_TRANSFERRING = ("110102", "Begin Transferring DICOM Instances")
    INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
    STUDY_DELETED = ("110105", "DICOM Study Deleted")
    QUERY = ("110112", "Query")
    SECURITY_ALERT = ("110113", "Security Alert")
    USER_AUTHENTICATION = ("110114", "User Authentication")


class EventType(enum.Enum):
    """CID 401 Audit Event Type Code: (code, meaning)."""

    APPLICATION_START = ("110120", "Application Start")
    APPLICATION_STOP = ("110121", "Application Stop")
    LOGIN = ("110122", "Login")
    LOGOUT = ("110123", "Logout")
    NODE_AUTHENTICATION = ("110126", "Node Authentication")
    SECURITY_CONFIGURATION = ("110129", "Security Configuration")
    USE_OF_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")


class Outcome(enum.IntEnum):
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Role(enum.Enum):
    """CID 402 Audit Active Participant Role ID Code."""

    APPLICATION = ("110150", "Application")
    APPLICATION_LAUNCHER = ("110151", "Application Launcher")
    DESTINATION = ("110152", "Destination Role ID")
    SOURCE = ("110153", "Source Role ID")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, a service account or a DICOM application."""

    user_id: str
    requestor: bool
    host: str | None = None
    role: Role | None = None
    alternative_id: str | None = None
    user_name: str | None = None


@dataclass(frozen=True)
class StudyObject:
    """The study and its patient as participant objects (patient ID may be unknown)."""

    study_uid: str
    patient_id: str | None = None
    description: str | None = None


@dataclass
class AuditMessage:
    event: Event
    action: str  # C R U D E
    outcome: Outcome
    participants: list[Participant]
    source_id: str
    site: str = ""
    event_type: EventType | None = None
    outcome_text: str | None = None
    studies: list[StudyObject] = field(default_factory=list)
    query: str | None = None
    alert_subject: str | None = None
    when: datetime = field(default_factory=lambda: datetime.now(UTC))

    def element(self) -> ET.Element:
        root = ET.Element("AuditMessage")
        ident = ET.SubElement(
            root,
            "EventIdentification",
            EventActionCode=self.action,
            EventDateTime=self.when.astimezone(UTC).isoformat(timespec="milliseconds"),
            EventOutcomeIndicator=str(int(self.outcome)),
        )
        _code(ident, "EventID", *self.event.value)
        if self.event_type is not None:
            _code(ident, "EventTypeCode", *self.event_type.value)
        if self.outcome_text:
            ET.SubElement(ident, "EventOutcomeDescription").text = _one_line(self.outcome_text)
        for who in self.participants:
            attrs = {"UserID": who.user_id, "UserIsRequestor": "true" if who.requestor else "false"}
            if who.alternative_id:
                attrs["AlternativeUserID"] = who.alternative_id
            if who.user_name:
                attrs["UserName"] = who.user_name
            if who.host:
                attrs["NetworkAccessPointID"] = who.host
                attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(who.host) else "1"
            node = ET.SubElement(root, "ActiveParticipant", attrs)
            if who.role is not None:
                _code(node, "RoleIDCode", *who.role.value)
        source_attrs = {"AuditSourceID": self.source_id}
        if self.site:
            source_attrs["AuditEnterpriseSiteID"] = self.site
        source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
        _code(source, "AuditSourceTypeCode", "4", "Application Server Process")
        for study in self.studies:
            obj = ET.SubElement(
                root,
                "ParticipantObjectIdentification",
                ParticipantObjectID=study.study_uid,
                ParticipantObjectTypeCode="2",
                ParticipantObjectTypeCodeRole="3",
            )
            _code(obj, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
            if study.description:  # free text goes in a detail, base64 as the schema wants
                ET.SubElement(
                    obj,
                    "ParticipantObjectDetail",
                    type="Description",
                    value=base64.b64encode(study.description.encode()).decode(),
                )
        patients = dict.fromkeys(s.patient_id for s in self.studies if s.patient_id)
        for patient_id in patients:
            obj = ET.SubElement(
                root,
                "ParticipantObjectIdentification",
                ParticipantObjectID=str(patient_id),
                ParticipantObjectTypeCode="1",
                ParticipantObjectTypeCodeRole="1",
            )
            _code(obj, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
        if self.query is not None:
            obj = ET.SubElement(
                root,
                "ParticipantObjectIdentification",
                ParticipantObjectID="1.2.840.10008.5.1.4.1.2.2.1",  # Study Root Q/R FIND
                ParticipantObjectTypeCode="2",
                ParticipantObjectTypeCodeRole="24",
            )
            _code(obj, "ParticipantObjectIDTypeCode", "110181", "SOP Class UID")
            ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(
                self.query.encode()
            ).decode()
        if self.alert_subject is not None:
            obj = ET.SubElement(
                root,
                "ParticipantObjectIdentification",
                ParticipantObjectID=self.alert_subject,
                ParticipantObjectTypeCode="2",
                ParticipantObjectTypeCodeRole="13",
            )
            _code(obj, "ParticipantObjectIDTypeCode", "12", "URI", "RFC-3881")
        return root

    def xml(self) -> str:
        """The message as one line of XML (UTF-8 text, no declaration)."""
        return ET.tostring(self.element(), encoding="unicode")


def _code(parent: ET.Element, tag: str, code: str, meaning: str, scheme: str = "DCM") -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": scheme, "originalText": meaning}
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


# ------------------------------------------------------------------------------ the node


@dataclass(frozen=True)
class Node:
    """The node as audit source and application participant."""

    ae_title: str
    host: str
    site: str = ""

    @classmethod
    def here(cls, ae_title: str, site: str = "") -> Node:
        return cls(ae_title, socket.gethostname(), site)

    @property
    def source_id(self) -> str:
        return f"{self.ae_title}@{self.host}"

    def participant(self, *, requestor: bool = False, role: Role | None = None) -> Participant:
        return Participant(
            self.ae_title,
            requestor,
            host=self.host,
            role=role,
            alternative_id=str(os.getpid()),
        )

    def message(self, event: Event, action: str, outcome: Outcome, **kw: object) -> AuditMessage:
        return AuditMessage(event, action, outcome, source_id=self.source_id, site=self.site, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ builders


def application_activity(node: Node, started: bool, who: str = "cxrnode serve") -> AuditMessage:
    return node.message(
        Event.APPLICATION_ACTIVITY,
        "E",
        Outcome.SUCCESS,
        event_type=EventType.APPLICATION_START if started else EventType.APPLICATION_STOP,
        participants=[
            node.participant(role=Role.APPLICATION),
            Participant(who, True, host=node.host, role=Role.APPLICATION_LAUNCHER),
        ],
    )


def user_authentication(
    node: Node, user: str, host: str, *, login: bool, ok: bool, why: str | None = None
) -> AuditMessage:
    return node.message(
        Event.USER_AUTHENTICATION,
        "E",
        Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
        event_type=EventType.LOGIN if login else EventType.LOGOUT,
        outcome_text=why,
        participants=[Participant(user, True, host=host), node.participant()],
    )


def query(node: Node, user: str, host: str, text: str) -> AuditMessage:
    """A study list or search: ``text`` is the query (path and filter values)."""
    return node.message(
        Event.QUERY,
        "E",
        Outcome.SUCCESS,
        query=text,
        participants=[
            Participant(user, True, host=host, role=Role.SOURCE),
            node.participant(role=Role.DESTINATION),
        ],
    )


def instances_accessed(
    node: Node,
    user: str,
    host: str,
    study: StudyObject,
    *,
    action: str = "R",
    outcome: Outcome = Outcome.SUCCESS,
    why: str | None = None,
) -> AuditMessage:
    """A study page or draft read (R), or a re-run that makes new draft instances (C)."""
    return node.message(
        Event.INSTANCES_ACCESSED,
        action,
        outcome,
        outcome_text=why,
        studies=[study],
        participants=[Participant(user, True, host=host), node.participant()],
    )


def instances_transferred(
    node: Node,
    peer_aet: str,
    peer_host: str | None,
    studies: list[StudyObject],
    *,
    received: bool,
    outcome: Outcome = Outcome.SUCCESS,
    why: str | None = None,
) -> AuditMessage:
    """Instances received from a PACS (C: the node creates them) or sent to a destination
    (R: read and sent). Source and destination roles as PS3.15 A.5.3.5 names them."""
    peer = Participant(
        peer_aet,
        received,
        host=peer_host,
        role=Role.SOURCE if received else Role.DESTINATION,
    )
    me = node.participant(
        requestor=not received, role=Role.DESTINATION if received else Role.SOURCE
    )
    return node.message(
        Event.INSTANCES_TRANSFERRED,
        "C" if received else "R",
        outcome,
        outcome_text=why,
        studies=studies,
        participants=[peer, me] if received else [me, peer],
    )


def begin_transferring(
    node: Node,
    peer_aet: str,
    peer_host: str | None,
    studies: list[StudyObject],
    *,
    requested_by: Participant | None = None,
    what: str | None = None,
) -> AuditMessage:
    """The node starts sending to ``peer_aet``; ``requested_by`` a person when one asked for
    it (a resend), who is then the requestor."""
    participants = [
        node.participant(requestor=requested_by is None, role=Role.SOURCE),
        Participant(peer_aet, False, host=peer_host, role=Role.DESTINATION),
    ]
    if requested_by is not None:
        participants.insert(0, requested_by)
    return node.message(
        Event.BEGIN_TRANSFERRING,
        "E",
        Outcome.SUCCESS,
        outcome_text=what,
        studies=studies,
        participants=participants,
    )


def security_alert(
    node: Node,
    who: str,
    host: str | None,
    what: str,
    *,
    subject: str,
    kind: EventType,
    outcome: Outcome = Outcome.MINOR_FAILURE,
) -> AuditMessage:
    """A refusal: ``who`` (user, token name or AE title) from ``host`` tried ``subject``; or,
    with ``outcome`` SUCCESS and kind SECURITY_CONFIGURATION, a change to who may do what
    (the description then says which)."""
    return node.message(
        Event.SECURITY_ALERT,
        "E",
        outcome,
        event_type=kind,
        outcome_text=what,
        alert_subject=subject,
        participants=[Participant(who, True, host=host), node.participant()],
    )


def study_deleted(node: Node, study: StudyObject, why: str = "retention") -> AuditMessage:
    return node.message(
        Event.STUDY_DELETED,
        "D",
        Outcome.SUCCESS,
        studies=[StudyObject(study.study_uid, study.patient_id, why)],
        participants=[node.participant(requestor=True, role=Role.APPLICATION)],
    )

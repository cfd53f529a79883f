"""The DICOM audit messages (PS3.15 A.5): structure, codes and participants of each event,
validated against the standard's schema (A.5.1.1, ``dicom-audit-message.rnc``) and checked
for the rules the schema cannot say, and the audit files: append-only, one message a line,
rotated into read-only files, shared by processes."""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import pytest
from audit_schema import assert_valid, schema_errors

from cxrnode.audit import messages as m
from cxrnode.audit.files import AuditFiles, Cursor

NODE = m.Node("CXRNODE", "node-host", "St Example")
STUDY = m.StudyObject("1.2.826.0.1.3680043.10.1.1", "PID-1", None)

EXAMPLES = {
    "110100": m.application_activity(NODE, started=True),
    "110114": m.user_authentication(NODE, "alice", "10.1.2.3", login=True, ok=False, why="wrong"),
    "110112": m.query(NODE, "alice", "10.1.2.3", "/studies?state=failed"),
    "110103": m.instances_accessed(NODE, "alice", "10.1.2.3", STUDY),
    "110104": m.instances_transferred(NODE, "PACS", "10.9.9.9", [STUDY], received=True),
    "110102": m.begin_transferring(NODE, "PACS", "10.9.9.9", [STUDY]),
    "110113": m.security_alert(
        NODE,
        "MODALITY",
        "10.4.4.4",
        "calling AE title not allowed",
        subject="association",
        kind=m.EventType.NODE_AUTHENTICATION,
    ),
    "110105": m.study_deleted(NODE, STUDY),
}

CODED = {"csd-code", "codeSystemName", "originalText"}
ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
#: PS3.15 A.5.1 order of the message's children.
ORDER = [
    "EventIdentification",
    "ActiveParticipant",
    "AuditSourceIdentification",
    "ParticipantObjectIdentification",
]


def check_schema_rules(message: ET.Element) -> None:
    """The rules of the PS3.15 A.5.1 schema a message of ours can break."""
    assert message.tag == "AuditMessage"
    tags = [child.tag for child in message]
    assert tags == sorted(tags, key=ORDER.index), tags
    assert tags.count("EventIdentification") == 1 and tags.count("AuditSourceIdentification") == 1
    assert tags.count("ActiveParticipant") >= 1
    ident = message.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") in ACTIONS
    assert ident.get("EventOutcomeIndicator") in OUTCOMES
    moment = datetime.fromisoformat(ident.get("EventDateTime", ""))
    assert moment.utcoffset() is not None, "EventDateTime carries its offset"
    children = [c.tag for c in ident]
    assert children[0] == "EventID" and set(children[1:]) <= {
        "EventTypeCode",
        "EventOutcomeDescription",
    }
    for coded in message.iter():
        if coded.tag in (
            "EventID",
            "EventTypeCode",
            "RoleIDCode",
            "AuditSourceTypeCode",
            "ParticipantObjectIDTypeCode",
        ):
            assert set(coded.attrib) == CODED, (coded.tag, coded.attrib)
    for who in message.findall("ActiveParticipant"):
        assert who.get("UserID") and who.get("UserIsRequestor") in ("true", "false")
        if who.get("NetworkAccessPointID"):
            assert who.get("NetworkAccessPointTypeCode") in ("1", "2")
    assert message.find("AuditSourceIdentification").get("AuditSourceID")  # type: ignore[union-attr]
    for obj in message.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode") in ("1", "2", "3", "4")
        assert obj[0].tag == "ParticipantObjectIDTypeCode"


@pytest.mark.parametrize("code", sorted(EXAMPLES))
def test_each_event_is_a_well_formed_dicom_audit_message(code: str) -> None:
    text = EXAMPLES[code].xml()
    assert "\n" not in text, "one message a line in the audit files"
    message = ET.fromstring(text)
    check_schema_rules(message)
    event = message.find("EventIdentification/EventID")
    assert event is not None and event.get("csd-code") == code
    assert event.get("codeSystemName") == "DCM"
    source = message.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "CXRNODE@node-host"
    assert source.get("AuditEnterpriseSiteID") == "St Example"


VARIANTS = [
    m.user_authentication(NODE, "alice", "10.1.2.3", login=False, ok=True),
    m.user_authentication(NODE, "bob", "10.1.2.4", login=True, ok=True),
    m.instances_transferred(NODE, "PACS", "10.9.9.9", [STUDY], received=False),
    m.instances_accessed(
        NODE, "alice", "10.1.2.3", m.StudyObject(STUDY.study_uid, None, "re-run"), action="C"
    ),
    m.application_activity(NODE, started=False),
    m.study_deleted(NODE, m.StudyObject(STUDY.study_uid, None)),
]


def test_every_message_is_valid_by_the_standards_schema() -> None:
    assert_valid([msg.xml() for msg in [*EXAMPLES.values(), *VARIANTS]])


@pytest.mark.parametrize(
    ("wrong", "right"),
    [
        ('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"'),  # not a value of the set
        ('ParticipantObjectTypeCode="2"', 'ParticipantObjectTypeCode="7"'),
        ("<EventID ", "<EventId "),  # an element the schema does not know
    ],
)
def test_the_schema_check_refuses_a_broken_message(wrong: str, right: str) -> None:
    text = EXAMPLES["110103"].xml()
    assert wrong in text
    assert schema_errors(text.replace(wrong, right, 1))


@pytest.mark.parametrize("code", ["110103", "110104", "110102", "110105"])
def test_events_touching_a_study_name_the_study_and_its_patient(code: str) -> None:
    message = ET.fromstring(EXAMPLES[code].xml())
    objects = {
        o.get("ParticipantObjectTypeCodeRole"): o
        for o in message.findall("ParticipantObjectIdentification")
    }
    study, patient = objects["3"], objects["1"]
    assert study.get("ParticipantObjectID") == STUDY.study_uid
    assert study.get("ParticipantObjectTypeCode") == "2"
    assert study[0].get("csd-code") == "110180"
    assert patient.get("ParticipantObjectID") == "PID-1"
    assert patient.get("ParticipantObjectTypeCode") == "1"


def test_the_requestor_and_the_roles_of_a_transfer_are_named() -> None:
    received = ET.fromstring(EXAMPLES["110104"].xml())
    peer, me = received.findall("ActiveParticipant")
    assert (peer.get("UserID"), peer.get("UserIsRequestor")) == ("PACS", "true")
    assert peer.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    assert me.find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    assert received.find("EventIdentification").get("EventActionCode") == "C"  # type: ignore[union-attr]
    sent = m.instances_transferred(NODE, "PACS", "10.9.9.9", [STUDY], received=False)
    me, peer = ET.fromstring(sent.xml()).findall("ActiveParticipant")
    assert me.get("UserIsRequestor") == "true" and peer.get("UserIsRequestor") == "false"


def test_a_failure_says_why_and_a_query_carries_its_text() -> None:
    failed = ET.fromstring(EXAMPLES["110114"].xml())
    ident = failed.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "4"
    assert ident.findtext("EventOutcomeDescription") == "wrong"
    query = ET.fromstring(EXAMPLES["110112"].xml())
    obj = query.find("ParticipantObjectIdentification")
    assert obj is not None and obj.get("ParticipantObjectTypeCodeRole") == "24"
    import base64

    assert base64.b64decode(obj.findtext("ParticipantObjectQuery") or "") == (
        b"/studies?state=failed"
    )


# ------------------------------------------------------------------------------ the files


def test_records_are_appended_and_a_rotated_file_becomes_read_only(tmp_path: Path) -> None:
    files = AuditFiles(tmp_path / "audit", max_bytes=4000)
    lines = [m.query(NODE, f"user{i}", "10.0.0.1", "/studies").xml() for i in range(12)]
    for line in lines:
        files.append(line)
    paths = files.files()
    assert len(paths) >= 2, "a file past AUDIT_FILE_MAX_MB is closed and a new one begun"
    assert list(files.records()) == lines
    for older in paths[:-1]:
        assert stat.S_IMODE(older.stat().st_mode) == 0o400
        assert older.stat().st_size <= 4000
    assert stat.S_IMODE(paths[-1].stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="line break"):
        files.append("two\nlines")


def test_the_cursor_resumes_after_the_last_record_sent(tmp_path: Path) -> None:
    files = AuditFiles(tmp_path / "audit", max_bytes=2000)
    for i in range(10):
        files.append(m.query(NODE, f"user{i}", "10.0.0.1", "/").xml())
    first = list(files.after(Cursor(0, 0), limit=4))
    files.save_cursor(first[-1][0])
    rest = [line for _, line in files.after(files.cursor())]
    assert len(rest) == 6 and 'UserID="user4"' in rest[0]


def _append_many(directory: str, who: int) -> None:
    files = AuditFiles(Path(directory), max_bytes=20000)
    for i in range(150):
        files.append(m.query(NODE, f"p{who}-{i}", "10.0.0.1", "/" + "x" * 50).xml())


def test_processes_append_to_the_same_files_without_interleaving(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(directory), n)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    records = list(AuditFiles(directory).records())
    assert len(records) == 600
    for record in records:
        ET.fromstring(record)  # each line whole
    names = {ET.fromstring(r).find("ActiveParticipant").get("UserID") for r in records}  # type: ignore[union-attr]
    assert len(names) == 600
    assert all(os.stat(p).st_size <= 20000 for p in AuditFiles(directory).files())


def test_the_examples_in_the_security_guide_are_valid_messages() -> None:
    guide = Path(__file__).parents[2] / "docs" / "security.md"
    blocks = re.findall(r"```xml\n(.*?)```", guide.read_text(), flags=re.S)
    assert len(blocks) >= 5
    assert_valid([block.strip() for block in blocks])

"""A whole node writes the DICOM side of the audit trail: its start and stop, the instances
each association stored (with the study and the patient), refused associations, and studies
whose files retention removed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pytest
from audit_schema import assert_valid
from services import Node, echoscu, storescu, wait_for

pytestmark = pytest.mark.slow


def trail(node: Node) -> list[ET.Element]:
    lines: list[str] = []
    for path in sorted((node.data_dir / "audit").glob("audit-*.log")):
        lines.extend(path.read_text().splitlines())
    assert_valid(lines)
    return [ET.fromstring(line) for line in lines]


def events(node: Node, code: str) -> list[ET.Element]:
    return [
        m
        for m in trail(node)
        if m.find("EventIdentification/EventID").get("csd-code") == code  # type: ignore[union-attr]
    ]


def test_the_node_audits_its_start_stop_receptions_and_refusals(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node(allowed_calling_aets="STORESCU,ECHOSCU")
    image = dicomgen.make_chest(tmp_path / "a.dcm", seed=3, rows=160, cols=160, patient_id="PID-A1")
    assert storescu(node.port, image).returncode == 0
    assert echoscu(node.port, calling="INTRUDER").returncode != 0
    assert echoscu(node.port, called="NOTUS").returncode != 0
    wait_for(lambda: events(node, "110104"), 30, "the association's audit record")
    (received,) = events(node, "110104")
    ident = received.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "C"
    sender = received.find("ActiveParticipant")
    assert sender is not None and sender.get("UserID") == "STORESCU"
    assert sender.get("NetworkAccessPointID") == "127.0.0.1"
    objects = {
        o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
        for o in received.findall("ParticipantObjectIdentification")
    }
    import pydicom

    assert objects["3"] == str(pydicom.dcmread(image).StudyInstanceUID)
    assert objects["1"] == "PID-A1"
    alerts = events(node, "110113")
    who = {a.find("ActiveParticipant").get("UserID") for a in alerts}  # type: ignore[union-attr]
    assert {"INTRUDER", "ECHOSCU"} <= who, "a refused caller and a wrong called AE title"
    node.stop()
    starts = [
        m.find("EventIdentification/EventTypeCode").get("csd-code")  # type: ignore[union-attr]
        for m in events(node, "110100")
    ]
    assert starts == ["110120", "110121"], "Application Start, then Stop"

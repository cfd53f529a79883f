"""End to end with a real PACS: Orthanc routes chest radiographs to a `cxrnode serve` node
running a tiny model, and the node's outputs (by default the text-report SR and the SC) come
back into the same study.

Everything is real: Orthanc (Debian package) with the demo PACS's routing script, dcmtk
``storescu`` as the modality, the node's listener, scheduler and Celery workers as
subprocesses, and Orthanc's REST API as the viewer that checks what arrived.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pydicom
import pytest
from dicom_checks import dciodvfy
from nodedb import instances, jobs, outputs
from orthanc_server import Orthanc
from pydicom import Dataset
from pydicom.uid import generate_uid
from services import Node, storescu

from cxrnode.outputs.build import PIPELINE_VERSION
from cxrnode.outputs.common import (
    DRAFT_NOTICE,
    FINDING_CONCEPTS,
    STATE_VALUES,
    series_description,
)
from cxrnode.outputs.text import report_text
from model.contracts import ModelResult

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, *logs: object) -> object:
    """Poll ``predicate``; on timeout fail with the logs of the parties involved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    tails = "\n\n".join(str(log)[-4000:] for log in logs)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def ai_objects(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """The study's SR and SC instances in the PACS, by SOP class."""
    found: dict[str, list[dict]] = {SR_CLASS: [], SC_CLASS: []}
    for instance in orthanc.instances_of_study(study_uid):
        sop_class = instance["Tags"].get("SOPClassUID")
        if sop_class in found:
            found[sop_class].append(instance)
    return found


def wait_for_reports(orthanc: Orthanc, node: Node, study_uids: list[str]) -> dict[str, dict]:
    def arrived() -> dict[str, dict] | None:
        result = {uid: ai_objects(orthanc, uid) for uid in study_uids}
        complete = all(r[SR_CLASS] and r[SC_CLASS] for r in result.values())
        return result if complete else None

    return wait_until(arrived, 240, "the SR and SC in the PACS", node.log(), orthanc.log())


def content_items(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR, depth first."""
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(content_items(item))
    return items


def coded_findings(sr: Dataset) -> set[tuple[str, str]]:
    """(finding code, value code) of each coded finding in the SR."""
    finding_codes = {code.value for code in FINDING_CONCEPTS.values()}
    pairs = set()
    for item in content_items(sr):
        if item.get("ValueType") != "CODE":
            continue
        name = item.ConceptNameCodeSequence[0].CodeValue
        if name in finding_codes:
            pairs.add((name, item.ConceptCodeSequence[0].CodeValue))
    return pairs


def expected_findings(findings: dict[str, str]) -> set[tuple[str, str]]:
    return {
        (FINDING_CONCEPTS[name].value, STATE_VALUES[state].value)
        for name, state in findings.items()
        if state != "not_mentioned"
    }


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# ------------------------------------------------------------------------------------------


def test_routed_studies_come_back_with_an_sr_and_an_sc_and_a_rerun_replaces_them(
    e2e_node: Callable[..., Node], orthanc: Orthanc, tmp_path: Path
) -> None:
    node = e2e_node()
    orthanc.start()
    node.start()
    real = dicomgen.pydicom_data_chest("RG1_UNCR")
    synthetic = generate_uid()
    pa = dicomgen.make_chest(tmp_path / "pa.dcm", study_uid=synthetic, modality="DX", view="PA")
    lateral = dicomgen.make_chest(
        tmp_path / "lat.dcm", study_uid=synthetic, modality="DX", view="LATERAL"
    )
    sent = storescu(orthanc.dicom_port, real, pa, lateral, called=orthanc.aet)
    assert sent.returncode == 0, sent.stderr
    studies = {uid_of(real): real, synthetic: pa}

    arrived = wait_for_reports(orthanc, node, list(studies))

    node_jobs = jobs(node)
    node_instances = {i.id: i for i in instances(node)}
    by_study = {node_instances[j.instance_id].study_instance_uid: j for j in node_jobs}
    assert set(by_study) == set(studies)
    # the routing sent the node only radiographs: nothing of its own came back to it
    assert {i.sop_class_uid for i in node_instances.values()} <= {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
    }
    assert len(node_instances) == 3

    for study_uid, source_path in studies.items():
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        job = by_study[study_uid]
        assert node_instances[job.instance_id].sop_instance_uid == source.SOPInstanceUID  # PA
        srs, scs = arrived[study_uid][SR_CLASS], arrived[study_uid][SC_CLASS]
        assert len(srs) == 1 and len(scs) == 1
        sr_tags, sc_tags = srs[0]["Tags"], scs[0]["Tags"]
        assert sr_tags["SeriesDescription"] == series_description("text_sr")
        assert sc_tags["SeriesDescription"] == series_description("sc")
        assert "AI DRAFT" in sr_tags["SeriesDescription"]
        assert sr_tags["VerificationFlag"] == "UNVERIFIED"
        assert sr_tags["PreliminaryFlag"] == "PRELIMINARY"
        assert sc_tags["BurnedInAnnotation"] == "YES"
        assert sr_tags["SeriesInstanceUID"] != sc_tags["SeriesInstanceUID"]
        assert source.SeriesInstanceUID not in (
            sr_tags["SeriesInstanceUID"],
            sc_tags["SeriesInstanceUID"],
        )

        sr_path = tmp_path / f"{study_uid}-sr.dcm"
        sr_path.write_bytes(orthanc.file(srs[0]["ID"]))
        sc_path = tmp_path / f"{study_uid}-sc.dcm"
        sc_path.write_bytes(orthanc.file(scs[0]["ID"]))
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == study_uid
        assert sr.PatientID == source.PatientID
        assert coded_findings(sr) == expected_findings(job.model_result.findings)
        assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"  # the text report
        texts = [str(item.TextValue) for item in content_items(sr) if "TextValue" in item]
        assert texts[0] == report_text(DRAFT_NOTICE)  # the first thing a reader sees
        draft = ModelResult.from_dict(job.result).for_pipeline(PIPELINE_VERSION)
        if report_text(draft.recommendation):
            assert report_text(draft.recommendation) in texts
        assert dciodvfy(sr_path).errors == [] and dciodvfy(sc_path).errors == []

    delivered = outputs(node)
    assert len(delivered) == 4
    assert {(o.state, o.attempts) for o in delivered} == {("delivered", 1)}
    stored = orthanc.stored_uids()
    assert all(stored.count(o.sop_instance_uid) == 1 for o in delivered)

    # A rerun: a fresh node (say, reinstalled) processes the same study again. The same
    # UIDs come back, so the PACS replaces its SR and SC instead of adding a second pair.
    node.stop()
    rerun = e2e_node(dicom_port=str(node.port))
    rerun.start()
    real_id = next(
        i["ID"]
        for i in orthanc.instances_of_study(uid_of(real))
        if i["Tags"]["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.1"
    )
    orthanc.post("/modalities/cxrnode/store", {"Resources": [real_id], "Synchronous": True})
    first_uids = {o.sop_instance_uid for o in delivered if o.job_id == by_study[uid_of(real)].id}
    wait_until(
        lambda: sum(o.state == "delivered" for o in outputs(rerun)) == 2,
        240,
        "the rerun's outputs to be delivered",
        rerun.log(),
    )
    assert {o.sop_instance_uid for o in outputs(rerun)} == first_uids
    again = ai_objects(orthanc, uid_of(real))
    assert len(again[SR_CLASS]) == 1 and len(again[SC_CLASS]) == 1
    assert again[SR_CLASS][0]["Tags"]["SOPInstanceUID"] in first_uids
    replaced = orthanc.stored_uids()
    assert all(replaced.count(uid) == 2 for uid in first_uids)  # stored again, not added


def test_outputs_wait_out_a_pacs_outage_and_a_node_restart_and_arrive_once(
    e2e_node: Callable[..., Node], orthanc: Orthanc, tmp_path: Path
) -> None:
    node = e2e_node()
    node.start()  # the PACS is down: nothing listens on its port
    real = dicomgen.pydicom_data_chest("RG1_UNCR")
    synthetic = dicomgen.make_chest(tmp_path / "pa.dcm", modality="DX", view="PA")
    assert storescu(node.port, real, synthetic).returncode == 0

    seen: dict[int, float] = {}  # attempts -> the delay the node chose after that try

    def observe(until_attempts: int) -> bool:
        rows = outputs(node)
        for row in rows:
            if row.state == "pending" and row.attempts:
                seen.setdefault(row.attempts, (row.next_try_at - row.updated_at).total_seconds())
        return len(rows) == 4 and min(r.attempts for r in rows) >= until_attempts

    wait_until(lambda: observe(3), 240, "three failed tries", node.log())
    # each delay is the policy's (1 s doubling, capped at 4 s), and they grow
    assert all(seen[n] == pytest.approx(min(4.0, 2.0 ** (n - 1)), abs=0.01) for n in seen)
    assert len(set(seen.values())) >= 2
    assert {o.state for o in outputs(node)} <= {"pending", "in_flight"}
    assert {o.last_status for o in outputs(node)} == {"no-connection"}

    # The node restarts while the outputs wait (at a moment when none is being sent).
    wait_until(lambda: all(o.state != "in_flight" for o in outputs(node)), 30, "a quiet moment")
    node.stop()
    before_restart = max(o.attempts for o in outputs(node))
    node.start()
    wait_until(lambda: observe(before_restart + 1), 60, "a try by the restarted node", node.log())

    orthanc.start()  # the PACS returns
    study_uids = [uid_of(real), uid_of(synthetic)]
    wait_for_reports(orthanc, node, study_uids)
    wait_until(lambda: {o.state for o in outputs(node)} == {"delivered"}, 30, "all rows delivered")
    rows = outputs(node)
    assert len(rows) == 4
    assert all(o.attempts > before_restart for o in rows)
    stored = orthanc.stored_uids()
    for row in rows:
        assert stored.count(row.sop_instance_uid) == 1, "delivered once, nothing lost"
    for study_uid in study_uids:
        found = ai_objects(orthanc, study_uid)
        assert len(found[SR_CLASS]) == 1 and len(found[SC_CLASS]) == 1


def test_a_wrong_called_ae_title_is_a_dead_letter_until_resend_after_the_fix(
    e2e_node: Callable[..., Node], orthanc: Orthanc, tmp_path: Path
) -> None:
    wrong = f"NOTORTHANC@127.0.0.1:{orthanc.dicom_port}"
    node = e2e_node(destinations=wrong)
    orthanc.start()  # DicomCheckCalledAet: it refuses associations addressed to another AE
    node.start()
    image = dicomgen.make_chest(tmp_path / "pa.dcm", modality="CR", view="PA")
    assert storescu(node.port, image).returncode == 0

    wait_until(
        lambda: len(outputs(node)) == 2 and {o.state for o in outputs(node)} == {"dead"},
        240,
        "the outputs to be dead letters",
        node.log(),
    )
    tries = {o.id: o.attempts for o in outputs(node)}
    time.sleep(4)  # several retry periods (base 1 s): a retry storm would show here
    rows = outputs(node)
    assert {(o.state, o.last_status) for o in rows} == {("dead", "rejected-permanent")}
    # Dead at the first permanent reject (an earlier try may have timed out on a busy machine)
    assert {o.id: o.attempts for o in rows} == tries
    assert all("resend" in o.last_error for o in rows)
    assert orthanc.log().count("bad called AET") == 1  # one association, never repeated
    status = json.loads(node.cli("status", "--json").stdout)
    assert sorted(d["id"] for d in status["dead_letters"]) == sorted(o.id for o in rows)
    assert "resend --output" in node.cli("status").stdout  # the admin is told what to run

    # The admin corrects DESTINATIONS, restarts the node and resends the dead letters.
    node.stop()
    fixed = e2e_node(dicom_port=str(node.port), data_dir=node.data_dir)
    fixed.start()
    answer = fixed.cli("resend", "--dead")
    assert "2 output(s) queued again" in answer.stdout
    wait_for_reports(orthanc, fixed, [uid_of(image)])
    wait_until(
        lambda: {o.state for o in outputs(fixed)} == {"delivered"}, 30, "delivery after resend"
    )
    assert {o.destination for o in outputs(fixed)} == {orthanc.destination}
    assert fixed.cli("resend", "--dead").stdout.strip().endswith("0 output(s) queued again")


def test_a_digitised_chest_film_is_routed_by_the_pacs_and_drafted(
    e2e_node: Callable[..., Node], orthanc: Orthanc, tmp_path: Path
) -> None:
    """A Secondary Capture with Modality CR and BodyPartExamined CHEST (JPEG baseline, as film
    digitisers make them) goes PACS -> node -> draft, like a CR."""
    node = e2e_node()
    orthanc.start()
    node.start()
    film = dicomgen.chest_secondary_capture(tmp_path / "film.dcm")
    sent = subprocess.run(  # dcmsend proposes the file's own (JPEG) transfer syntax
        ["/usr/bin/dcmsend", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), str(film)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for_reports(orthanc, node, [uid_of(film)])
    (instance,) = instances(node)
    assert instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert instance.state == "stored" and instance.skip_reason is None

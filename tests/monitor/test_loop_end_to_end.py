"""Closing the loop, end to end, with one `cxrnode serve` node and real peers.

Images arrive from dcmtk ``storescu``; the node (tiny checkpoint, real Celery workers) sends
its SR and SC to dcmtk ``storescp`` and its HL7 ORU draft to a RIS-like MLLP server (python-hl7's
asyncio server). Then the radiologists' reports come back: one as a Basic Text SR by
``storescu``, one as HL7 ORU^R01 over MLLP (preliminary, then final, then a correction).
``cxrnode monitor --json`` and the Prometheus collector show the agreement, and move.
Bad DICOM input (an SR without text, a report for an unknown study, our own draft coming back)
is answered with success, kept and recorded, and the listener keeps serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "hl7"))

import dicomgen  # noqa: E402
from loop_helpers import MllpPeer, ack_fields, exchange, mllp_peer, oru  # noqa: E402
from radiologist_sr import radiologist_sr  # noqa: E402
from services import Node, free_port, node_env, port_open, storescu, wait_for  # noqa: E402

from cxrnode.db import (  # noqa: E402
    Agreement,
    FinalReport,
    Job,
    Output,
    ReportState,
    Study,
    make_engine,
    make_sessionmaker,
)
from cxrnode.monitor.metrics import AgreementCollector  # noqa: E402
from cxrnode.outputs.findings_sr import DRAFT_NOTICE, FINDING_CONCEPTS, STATE_VALUES  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402
from model.contracts import FINDINGS  # noqa: E402
from model.labeler import label_report_states  # noqa: E402

pytestmark = pytest.mark.slow

PATIENTS = {"1": ("ACC-E2E-1", "PAT-E2E-1"), "2": ("ACC-E2E-2", "PAT-E2E-2")}
NORMAL = "No acute cardiopulmonary process. The lungs are clear."


# ------------------------------------------------------------------------------- the site


@dataclass
class Site:
    node: Node
    ris: MllpPeer
    received: Path  # what storescp wrote
    hl7_port: int
    studies: dict[str, str]  # "1"/"2" -> Study Instance UID
    tmp: Path

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.node.data_dir / 'cxrnode.db'}"

    def rows(self, model: type) -> list:
        engine = create_engine(self.db_url)
        try:
            with Session(engine) as session:
                return list(session.scalars(select(model).order_by(model.id)))
        finally:
            engine.dispose()

    def study_id(self, key: str) -> int:
        return next(s.id for s in self.rows(Study) if s.study_instance_uid == self.studies[key])

    def agreement(self, key: str) -> dict[str, Agreement]:
        study_id = self.study_id(key)
        return {a.finding: a for a in self.rows(Agreement) if a.study_id == study_id}

    def draft(self, key: str) -> dict[str, str]:
        study_id = self.study_id(key)
        job = max((j for j in self.rows(Job) if j.study_id == study_id), key=lambda j: j.id)
        return dict(job.result["findings"])

    def monitor_json(self) -> dict:
        return json.loads(self.node.cli("monitor", "--json", "--resamples", "200").stdout)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("loop")
    received = tmp / "storescp"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with mllp_peer("AA") as ris:
        hl7_port = free_port()
        data = tmp / "node"
        env = node_env(
            data,
            model=str(tiny_model),
            temperature="0",
            max_new_tokens="12",
            settle_seconds="1",
            scp_processes="1",
            destinations=f"STORESCP@127.0.0.1:{pacs_port}",
            hl7_destinations=f"mllp://127.0.0.1:{ris.port}",
            hl7_port=str(hl7_port),
            hl7_host="127.0.0.1",
            monitor_interval_seconds="1",
            send_retry_base_seconds="1",
            send_retry_max_seconds="4",
            send_timeout="5",
            reconcile_interval="2",
        )
        node = Node(data, env)
        try:
            wait_for(lambda: port_open(pacs_port), 10, "storescp")
            node.start()
            wait_for(lambda: port_open(hl7_port), 30, "the node's MLLP listener")
            yield Site(node, ris, received, hl7_port, {}, tmp)
        finally:
            node.stop()
            pacs.terminate()
            pacs.wait(10)


def collected(site: Site) -> dict[tuple[str, tuple], float]:
    """Every sample the agreement collector gives for the node's database."""
    engine = make_engine(site.db_url, read_only=True)
    try:
        collector = AgreementCollector(
            make_sessionmaker(engine), Settings(monitor_windows_days=[7, 30])
        )
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in collector.collect()
            for sample in family.samples
        }
    finally:
        engine.dispose()


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def expected_counts(pairs: list[tuple[str, str, str]]) -> dict[str, tuple[int, int, int, int]]:
    """TP/FP/FN/TN per finding from (finding, ai, radiologist), worked out here independently:
    present 1, absent 0, no_finding unmentioned 0, anything else left out."""
    value = {"present": 1, "absent": 0}
    out: dict[str, list[int]] = {f: [0, 0, 0, 0] for f in FINDINGS}
    for finding, ai, radiologist in pairs:
        p, t = value.get(ai), value.get(radiologist)
        if finding == "no_finding":
            p = 0 if ai == "not_mentioned" else p
            t = 0 if radiologist == "not_mentioned" else t
        if p is None or t is None:
            continue
        out[finding][{(1, 1): 0, (1, 0): 1, (0, 1): 2, (0, 0): 3}[(p, t)]] += 1
    return {f: tuple(v) for f, v in out.items()}


# ---------------------------------------------------------------------------------- tests


def test_drafts_go_out_as_sr_sc_and_hl7_and_final_reports_come_back_scored(site: Site) -> None:
    images = []
    for key, (accession, patient_id) in PATIENTS.items():
        site.studies[key] = generate_uid()
        images.append(
            dicomgen.make_chest(
                site.tmp / f"image{key}.dcm",
                study_uid=site.studies[key],
                modality="DX",
                view="PA",
                patient_id=patient_id,
                rows=256,
                cols=256,
                extra={"AccessionNumber": accession},
            )
        )
    sent = storescu(site.node.port, *images)
    assert sent.returncode == 0, sent.stderr

    # ---- drafts out: SR and SC to storescp, ORU to the RIS, each delivered
    def delivered() -> bool:
        rows = site.rows(Output)
        return len(rows) == 6 and all(r.state == "delivered" for r in rows)

    wait_for(delivered, 300, "the SR, SC and HL7 drafts to be delivered")
    assert sorted(r.kind for r in site.rows(Output)) == [
        "hl7",
        "hl7",
        "sc",
        "sc",
        "text_sr",
        "text_sr",
    ]
    messages = {str(m.segment("OBR")(3)): m for m in site.ris.messages()}
    assert set(messages) == {accession for accession, _ in PATIENTS.values()}
    for key, (accession, patient_id) in PATIENTS.items():
        message = messages[accession]
        assert str(message.segment("OBR")(25)) == "P"
        assert str(message.segment("PID")(3)).split("^")[0] == patient_id
        observations = message.segments("OBX")
        assert message.unescape(str(observations[0](5))) == DRAFT_NOTICE
        coded = {
            (str(obx(3)(1)(1)), str(obx(5)(1)(1))) for obx in observations if str(obx(2)) == "CWE"
        }
        assert coded == {
            (FINDING_CONCEPTS[name].value, STATE_VALUES[state].value)
            for name, state in site.draft(key).items()
            if state != "not_mentioned"
        }
    before = collected(site)
    assert sample(before, "cxrnode_agreement_studies", finding="no_finding", model="x") is None
    assert not any(name == "cxrnode_agreement_studies" for name, _ in before)

    # ---- study 1: the radiologist's report as a Basic Text SR, by dcmtk storescu
    accession, patient_id = PATIENTS["1"]
    report_1 = {"History": "Cough, fever.", "Findings": NORMAL, "Impression": "Normal chest."}
    sr = radiologist_sr(
        site.tmp / "report1.dcm",
        study_uid=site.studies["1"],
        accession=accession,
        patient_id=patient_id,
        sections=report_1,
    )
    answer = storescu(site.node.port, sr)
    assert answer.returncode == 0 and "Success" in answer.stdout + answer.stderr

    # ---- study 2: HL7 over MLLP, preliminary then final
    accession, patient_id = PATIENTS["2"]
    preliminary, final = exchange(
        site.hl7_port,
        oru(accession=accession, patient_id=patient_id, status="P", text="Possible effusion."),
        oru(accession=accession, patient_id=patient_id, status="F", text=NORMAL),
    )
    assert ack_fields(preliminary)["MSA"][1] == ack_fields(final)["MSA"][1] == "AA"

    wait_for(
        lambda: (
            len(site.agreement("1")) == 9
            and site.agreement("2").get("pleural_effusion") is not None
            and site.agreement("2")["pleural_effusion"].radiologist == "not_mentioned"
        ),
        60,
        "both studies to be scored against their final reports",
    )
    sr_text = "History: Cough, fever.\nFinding: " + NORMAL + "\nImpression: Normal chest."
    for key, text in (("1", sr_text), ("2", NORMAL)):
        truth, draft = label_report_states(text), site.draft(key)
        rows = site.agreement(key)
        assert {f: (a.ai, a.radiologist) for f, a in rows.items()} == {
            f: (draft[f], truth[f]) for f in FINDINGS
        }
    reports = site.rows(FinalReport)
    assert [(r.source, r.state, r.status) for r in reports] == [
        ("dicom", ReportState.matched, "final"),
        ("hl7", ReportState.matched, "preliminary"),
        ("hl7", ReportState.matched, "final"),
    ]

    # ---- cxrnode monitor --json: the rows, with the counts of the agreement table
    shown = site.monitor_json()
    assert [w["window"] for w in shown["windows"]] == ["7d", "30d", "all"]
    everything = shown["windows"][-1]
    assert everything["studies"] == 2
    pairs = [(a.finding, a.ai, a.radiologist) for a in site.rows(Agreement)]
    counts = expected_counts(pairs)
    for row in everything["rows"]:
        assert row["studies"] == 2
        assert (row["tp"], row["fp"], row["fn"], row["tn"]) == counts[row["finding"]]
        assert row["pairs"] == sum(counts[row["finding"]])
    for item in shown["disagreements"]:
        assert item["study_instance_uid"] in site.studies.values()
        assert item["kind"] in ("ai_only", "radiologist_only")

    # ---- the collector's metrics moved
    after = collected(site)
    model = everything["rows"][0]["model"]
    for window in ("7d", "30d", "all"):
        assert (
            sample(
                after, "cxrnode_agreement_studies", finding="no_finding", model=model, window=window
            )
            == 2
        )
    no_finding = next(r for r in everything["rows"] if r["finding"] == "no_finding")
    assert (
        sample(after, "cxrnode_agreement_pairs", finding="no_finding", model=model, window="all")
        == no_finding["pairs"]
    )
    if no_finding["f1"] is not None:
        assert sample(
            after, "cxrnode_agreement_f1", finding="no_finding", model=model, window="all"
        ) == pytest.approx(no_finding["f1"])
    assert sample(after, "cxrnode_final_reports", source="hl7", state="matched") == 2
    assert sample(after, "cxrnode_agreement_f1_floor") == 0.4

    # ---- a correction re-scores study 2
    correction = oru(
        accession=accession, patient_id=patient_id, status="C", text="Large right pneumothorax."
    )
    (ack,) = exchange(site.hl7_port, correction)
    assert ack_fields(ack)["MSA"][1] == "AA"
    wait_for(
        lambda: site.agreement("2")["pneumothorax"].radiologist == "present",
        30,
        "the correction to re-score study 2",
    )
    assert site.agreement("2")["no_finding"].radiologist == "not_mentioned"
    corrected = collected(site)
    moved = {
        key
        for key in set(after) | set(corrected)
        if key[0].startswith("cxrnode_agreement_") and after.get(key) != corrected.get(key)
    }
    assert any(dict(labels).get("finding") == "no_finding" for _, labels in moved), moved
    counts = expected_counts([(a.finding, a.ai, a.radiologist) for a in site.rows(Agreement)])
    everything = site.monitor_json()["windows"][-1]
    for row in everything["rows"]:
        assert (row["tp"], row["fp"], row["fn"], row["tn"]) == counts[row["finding"]]

    table = site.node.cli("monitor", "--resamples", "200").stdout
    assert "AI draft vs radiologist, all time" in table and "no_finding" in table
    print("\n" + table)  # the README sample comes from here (pytest -s)
    csv_rows = site.node.cli("monitor", "--csv", "--window", "0").stdout.splitlines()
    assert csv_rows[0].startswith("window,model,model_hash,finding,studies,pairs,tp,fp,fn,tn")
    assert len(csv_rows) == 1 + len(FINDINGS)


def test_bad_or_foreign_srs_are_kept_recorded_and_answered_and_the_listener_keeps_serving(
    site: Site,
) -> None:
    if "1" not in site.studies:
        pytest.skip("needs the drafted studies of the test before")
    scored_before = {f: a.radiologist for f, a in site.agreement("1").items()}
    no_text = radiologist_sr(
        site.tmp / "empty.dcm", study_uid=site.studies["1"], sections={}, accession="ACC-E2E-1"
    )
    unknown_study = generate_uid()
    unknown = radiologist_sr(
        site.tmp / "unknown.dcm",
        study_uid=unknown_study,
        sections={"Impression": "Small left pleural effusion."},
        accession="NOT-HERE",
    )
    ours = next(
        path
        for path in site.received.iterdir()
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR"
    )

    for path in (no_text, unknown, ours):
        answer = storescu(site.node.port, path)
        assert answer.returncode == 0, answer.stderr
        assert "Received Store Response (Success)" in answer.stdout + answer.stderr

    reports = {r.message_id: r for r in site.rows(FinalReport)}
    empty_row = reports[str(pydicom.dcmread(no_text).SOPInstanceUID)]
    assert empty_row.state == ReportState.rejected
    assert "no TEXT content item" in empty_row.reason
    unknown_row = reports[str(pydicom.dcmread(unknown).SOPInstanceUID)]
    assert (unknown_row.state, unknown_row.study_id) == (ReportState.unmatched, None)
    assert unknown_row.study_instance_uid == unknown_study
    ours_row = reports[str(pydicom.dcmread(ours, stop_before_pixels=True).SOPInstanceUID)]
    assert ours_row.state == ReportState.ignored and "our own AI draft" in ours_row.reason
    for row in (empty_row, unknown_row, ours_row):
        assert (site.node.data_dir / "reports" / row.path).is_file()  # kept
        assert row.answer == "0x0000"
    assert {f: a.radiologist for f, a in site.agreement("1").items()} == scored_before
    again = storescu(site.node.port, no_text)  # still serving; a duplicate is kept once
    assert again.returncode == 0
    assert sum(r.message_id == empty_row.message_id for r in site.rows(FinalReport)) == 1

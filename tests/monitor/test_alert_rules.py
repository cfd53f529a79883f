"""The Prometheus side: the alert rules pass ``promtool check rules`` and fire as intended in
``promtool test rules``; the collector's exposition, from a real scored database, passes
``promtool check metrics`` and carries no patient data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hl7"))

from loop_helpers import seed_study  # noqa: E402

from cxrnode.db import ReportSource, ReportState, ReportStatus, make_engine, make_sessionmaker  # noqa: E402
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.monitor.metrics import AgreementCollector  # noqa: E402
from cxrnode.monitor.reports import IncomingReport, record_report  # noqa: E402
from cxrnode.monitor.scoring import score_studies  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402

HERE = Path(__file__).resolve().parent
RULES = HERE.parents[1] / "config" / "prometheus" / "agreement-rules.yml"


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    assert found, "promtool is missing: apt-get install prometheus (scripts/setup installs it)"
    return found


def test_the_alert_rules_are_valid_prometheus_rules() -> None:
    checked = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 rules found" in checked.stdout


def test_the_alerts_fire_below_the_floor_on_enough_pairs_over_a_rolling_window_only() -> None:
    tested = subprocess.run(
        [promtool(), "test", "rules", "agreement-rules.test.yml"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_collector_exposition_passes_promtool_and_names_no_patient(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    study_uid = "1.2.826.0.1.3680043.10.7.1"
    study_id, _ = seed_study(
        sessions,
        study_uid,
        accession="ACC-SECRET-7",
        patient_id="PATIENT-SECRET-7",
        findings={"cardiomegaly": "present", "no_finding": "not_mentioned"},
    )
    with sessions() as session:
        record_report(
            session,
            IncomingReport(
                source=ReportSource.hl7,
                state=ReportState.unmatched,
                status=ReportStatus.final,
                text="Cardiomegaly. No effusion.",
                message_id="RIS|H|1",
                accession_number="ACC-SECRET-7",
                patient_id="PATIENT-SECRET-7",
            ),
            path=None,
            peer="10.0.0.9",
            answer="AA",
        )
        session.commit()
    assert score_studies(sessions, [study_id]) == 1

    registry = CollectorRegistry()
    registry.register(AgreementCollector(sessions, Settings(monitor_windows_days=[7, 30])))
    exposition = generate_latest(registry)
    engine.dispose()

    text = exposition.decode()
    assert (
        'cxrnode_agreement_f1{finding="cardiomegaly",model="cdcdcdcdcdcdcdcd",window="7d"} 1.0'
        in text
    )
    assert 'cxrnode_final_reports{source="hl7",state="matched"} 1.0' in text
    for secret in ("SECRET", study_uid, "10.0.0.9"):
        assert secret not in text
    checked = subprocess.run(
        [promtool(), "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_registering_the_collector_reads_no_database() -> None:
    def no_database() -> None:
        raise AssertionError("describe() must not open a session")

    registry = CollectorRegistry()
    registry.register(AgreementCollector(no_database, Settings()))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="must not open"):
        generate_latest(registry)

"""Scoring and the agreement functions on a real database: which report counts, rolling
windows, one series per model, disagreements for error analysis, the sweep, and the migration
(on SQLite and PostgreSQL where the database matters)."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hl7"))

from loop_helpers import seed_study  # noqa: E402

from cxrnode.db import (  # noqa: E402
    Agreement,
    FinalReport,
    JobState,
    ReportSource,
    ReportState,
    ReportStatus,
    Study,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.db.migrate import current_revision, upgrade  # noqa: E402
from cxrnode.monitor import disagreements, summaries, summary  # noqa: E402
from cxrnode.monitor.reports import IncomingReport, record_report  # noqa: E402
from cxrnode.monitor.scoring import chosen_report, score_studies, sweep  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402

P, F, C, X = (
    ReportStatus.preliminary,
    ReportStatus.final,
    ReportStatus.corrected,
    ReportStatus.cancelled,
)


def report(n: int, status: ReportStatus) -> SimpleNamespace:
    return SimpleNamespace(id=n, status=status, received_at=utcnow() + timedelta(seconds=n))


@pytest.mark.parametrize(
    ("statuses", "chosen"),
    [
        ([P], 0),
        ([P, F], 1),
        ([P, F, P], 1),  # a preliminary after the final does not replace it
        ([F, C], 1),
        ([F, C, F], 2),  # the latest final-or-corrected counts
        ([P, P], 1),
        ([F, X], None),  # cancelled: nothing to compare with
        ([F, X, P], 2),
        ([], None),
    ],
)
def test_the_report_that_counts(statuses: list[ReportStatus], chosen: int | None) -> None:
    reports = [report(n, status) for n, status in enumerate(statuses)]
    picked = chosen_report(list(reversed(reports)))  # order of arrival decides, not of the list
    assert (None if picked is None else picked.id) == chosen


def sessions_for(url: str) -> sessionmaker:
    engine = make_engine(url)
    upgrade(engine)
    return make_sessionmaker(engine)


def add_report(
    sessions: sessionmaker,
    *,
    accession: str,
    text: str,
    status: ReportStatus = ReportStatus.final,
    days_ago: float = 0,
    patient_id: str | None = None,
) -> FinalReport:
    with sessions() as session:
        row = record_report(
            session,
            IncomingReport(
                source=ReportSource.hl7,
                state=ReportState.unmatched,
                status=status,
                text=text,
                message_id=f"RIS|H|{accession}|{status}|{days_ago}",
                accession_number=accession,
                patient_id=patient_id,
            ),
            path=None,
            peer=None,
            answer="AA",
            now=utcnow() - timedelta(days=days_ago),
        )
        session.commit()
        return row


def test_reports_are_matched_and_scored_on_sqlite_and_postgresql(database_url: str) -> None:
    sessions = sessions_for(database_url)
    study_id, job_id = seed_study(
        sessions,
        "1.2.826.0.1.3680043.10.5.1",
        accession="ACC-5",
        patient_id="PAT-5",
        findings={"pleural_effusion": "present", "no_finding": "not_mentioned"},
    )
    row = add_report(sessions, accession="ACC-5", patient_id="PAT-5", text="Small effusion.")
    assert (row.state, row.study_id) == (ReportState.matched, study_id)
    assert score_studies(sessions, [study_id, study_id]) == 1
    assert score_studies(sessions, [study_id]) == 1  # the same rows again: no change
    with sessions() as session:
        rows = list(session.scalars(select(Agreement).where(Agreement.study_id == study_id)))
        assert len(rows) == 9 and {r.job_id for r in rows} == {job_id}
        effusion = next(r for r in rows if r.finding == "pleural_effusion")
        assert (effusion.ai, effusion.radiologist) == ("present", "present")
        assert session.get(FinalReport, row.id).scored_job_id == job_id
        session.rollback()
    shown = summary(sessions(), Settings(), None, resamples=0)
    effusion_row = next(r for r in shown["rows"] if r["finding"] == "pleural_effusion")
    assert (effusion_row["tp"], effusion_row["pairs"], effusion_row["f1"]) == (1, 1, 1.0)


def test_windows_count_by_when_the_report_arrived_and_models_are_scored_apart(
    tmp_path: Path,
) -> None:
    sessions = sessions_for(f"sqlite:///{tmp_path / 'node.db'}")
    old_model, new_model = "aa" * 32, "bb" * 32
    studies = []
    for n, (days_ago, model_hash) in enumerate(
        [(2, new_model), (3, new_model), (20, new_model), (60, old_model)]
    ):
        study_id, _ = seed_study(
            sessions,
            f"1.2.826.0.1.3680043.10.6.{n}",
            accession=f"ACC-6-{n}",
            findings={"cardiomegaly": "present"},
            model_hash=model_hash,
        )
        add_report(sessions, accession=f"ACC-6-{n}", text="No cardiomegaly.", days_ago=days_ago)
        studies.append(study_id)
    score_studies(sessions, studies)

    with sessions() as session:
        shown = {s["window"]: s for s in summaries(session, Settings(), resamples=0)}
    assert {w: s["studies"] for w, s in shown.items()} == {"7d": 2, "30d": 3, "all": 4}
    models = {(r["window"], r["model"]) for s in shown.values() for r in s["rows"]}
    assert ("all", "aaaaaaaaaaaaaaaa") in models and ("30d", "aaaaaaaaaaaaaaaa") not in models
    cardio = next(
        r
        for r in shown["all"]["rows"]
        if r["finding"] == "cardiomegaly" and r["model"] == "bbbbbbbbbbbbbbbb"
    )
    assert (cardio["fp"], cardio["tp"], cardio["ppv"]) == (3, 0, 0.0)

    with sessions() as session:
        wrong = disagreements(session, window_days=7, finding="cardiomegaly")
        everything = disagreements(session, limit=2)
        with pytest.raises(ValueError, match="unknown finding"):
            disagreements(session, finding="fracture")
    assert [w["kind"] for w in wrong] == ["ai_only", "ai_only"]
    assert wrong[0]["reported_at"] > wrong[1]["reported_at"]  # newest first
    assert {w["study_instance_uid"] for w in wrong} == {
        "1.2.826.0.1.3680043.10.6.0",
        "1.2.826.0.1.3680043.10.6.1",
    }
    assert len(everything) == 2


def test_the_sweep_matches_late_studies_and_rescores_a_newer_draft(tmp_path: Path) -> None:
    sessions = sessions_for(f"sqlite:///{tmp_path / 'node.db'}")
    early = add_report(sessions, accession="ACC-8", text="Left lower lobe atelectasis.")
    assert early.state == ReportState.unmatched
    assert sweep(sessions) == (0, 0)  # nothing to do: nothing written

    study_id, first_job = seed_study(
        sessions, "1.2.826.0.1.3680043.10.8.1", accession="ACC-8", state=JobState.inferred
    )
    result = sweep(sessions)
    assert result.matched == 1 and result.scored == 0  # matched, but no draft finished yet
    with sessions() as session:
        session.execute(sa.update(Study).values(version=2))
        session.execute(sa.text("UPDATE jobs SET state = 'done' WHERE id = :id"), {"id": first_job})
        session.commit()
    assert sweep(sessions).scored == 1
    with sessions() as session:
        atelectasis = session.scalars(
            select(Agreement).where(
                Agreement.study_id == study_id, Agreement.finding == "atelectasis"
            )
        ).one()
        assert (atelectasis.job_id, atelectasis.radiologist) == (first_job, "present")
        session.rollback()
    assert sweep(sessions) == (0, 0)  # scored against the latest draft: quiet again


def test_the_migration_backfills_accession_numbers_from_recorded_headers(
    database_url: str,
) -> None:
    engine = make_engine(database_url)
    upgrade(engine, "0002")
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO studies (id, study_instance_uid, state, first_arrival, last_arrival, "
                "settle_at, instance_count, version) VALUES (1, '1.2.3', 'settled', :n, :n, :n, 1, 1)"
            ),
            {"n": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, transfer_syntax_uid, path, size_bytes, calling_aet, state, "
                "received_at, study_id, header) VALUES (1, '1.2.3.4', '1.2', '1.2.3', '1.2.3.5', "
                "'1.2.840.10008.1.2.1', 'x', 1, 'T', 'stored', :n, 1, :h)"
            ),
            {"n": now, "h": '{"00080050": {"vr": "SH", "Value": ["ACC-OLD"]}}'},
        )
    upgrade(engine, "0003b")
    assert current_revision(engine) == "0003b"
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT accession_number FROM studies")) == "ACC-OLD"
    engine.dispose()

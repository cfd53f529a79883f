"""Agreement with the radiologist per consensus setting: a voted draft (k samples) is scored
as its own model, so k = 5 and k = 1 stand side by side in every per-model view."""

from __future__ import annotations

from pathlib import Path

from loop_helpers import seed_study
from sqlalchemy import update

from cxrnode.db import (
    Job,
    ReportSource,
    ReportState,
    ReportStatus,
    make_engine,
    make_sessionmaker,
)
from cxrnode.db.migrate import upgrade
from cxrnode.monitor import summaries
from cxrnode.monitor.reports import IncomingReport, record_report
from cxrnode.monitor.scoring import score_studies
from cxrnode.settings import Settings

MODEL = "ab" * 32


def test_voted_and_single_sample_drafts_are_scored_apart(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    studies = []
    for n, samples in enumerate((1, 1, 5, 5)):
        study_id, job_id = seed_study(
            sessions,
            f"1.2.826.0.1.3680043.10.21.{n}",
            accession=f"ACC-21-{n}",
            findings={"cardiomegaly": "present" if samples == 1 else "absent"},
            model_hash=MODEL,
        )
        if samples > 1:
            with sessions() as session:
                job = session.get(Job, job_id)
                votes = {"cardiomegaly": {"absent": 4, "present": 1}}
                result = {**job.result, "samples": samples, "votes": votes}
                session.execute(update(Job).where(Job.id == job_id).values(result=result))
                session.commit()
        with sessions() as session:
            record_report(
                session,
                IncomingReport(
                    source=ReportSource.hl7,
                    state=ReportState.unmatched,
                    status=ReportStatus.final,
                    text="No cardiomegaly.",
                    message_id=f"RIS|H|m{n}",
                    accession_number=f"ACC-21-{n}",
                ),
                path=None,
                peer=None,
                answer="AA",
            )
            session.commit()
        studies.append(study_id)
    score_studies(sessions, studies)
    with sessions() as session:
        shown = {s["window"]: s for s in summaries(session, Settings(), resamples=0)}
    rows = {r["model"]: r for r in shown["all"]["rows"] if r["finding"] == "cardiomegaly"}
    assert set(rows) == {"abababababababab", "abababababababab~k5"}
    assert (rows["abababababababab"]["fp"], rows["abababababababab"]["tp"]) == (2, 0)
    assert (rows["abababababababab~k5"]["tn"], rows["abababababababab~k5"]["fp"]) == (2, 0)
    assert rows["abababababababab~k5"]["model_id"].endswith("(k=5)")
    engine.dispose()

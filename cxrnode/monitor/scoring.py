"""Scoring: the AI draft of a study beside its radiologist's report, finding by finding.

A study is scored when both halves exist: a matched report and a finished draft (a job in
state ``done``). Scoring writes one :class:`~cxrnode.db.Agreement` row per finding, with the
draft's state (``ModelResult.findings``, from the labeler reading the model's report) and the
radiologist's (the same labeler reading the radiologist's text), replacing what the study had.

Which report counts (:func:`chosen_report`), in order of arrival: a preliminary report counts
until a final one arrives; a final or corrected report replaces whatever came before it; a
preliminary one arriving after a final one does not replace it; a cancellation withdraws the
study from scoring until a newer report arrives. The draft that counts is the study's latest
finished one.

When it happens:

- at once, after an entrance records a report (:func:`score_studies`);
- in :func:`sweep`, run by the monitor thread every ``MONITOR_INTERVAL_SECONDS``: reports
  still unmatched are matched when their study has arrived, and studies whose latest draft
  is newer than the one their reports were scored against are scored again (a draft that
  finished after its report, a re-run). The sweep reads first and writes only when it found
  work, so an idle node takes no write lock.

Scoring the same study twice gives the same rows, so concurrent scorers (the listener and the
monitor thread) converge; on PostgreSQL the study row is locked while it is scored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Subquery

from cxrnode.db import (
    Agreement,
    FinalReport,
    Job,
    JobState,
    ReportState,
    ReportStatus,
    Study,
    utcnow,
)
from cxrnode.monitor.reports import match_study
from model.contracts import FINDINGS, ModelResult

__all__ = [
    "MATCH_DAYS",
    "SweepResult",
    "chosen_report",
    "latest_draft",
    "score_studies",
    "score_study",
    "sweep",
]

log = logging.getLogger(__name__)

#: Unmatched reports older than this are no longer matched by the sweep.
MATCH_DAYS = 90

_REPLACES_ANY = frozenset({ReportStatus.final, ReportStatus.corrected})


def chosen_report(reports: Sequence[FinalReport]) -> FinalReport | None:
    """The report that counts among a study's matched reports (see the module docstring)."""
    current: FinalReport | None = None
    for report in sorted(reports, key=lambda r: (r.received_at, r.id)):
        preliminary_may_replace = current is None or current.status == ReportStatus.preliminary
        if report.status == ReportStatus.cancelled:
            current = None
        elif report.status in _REPLACES_ANY or (
            report.status == ReportStatus.preliminary and preliminary_may_replace
        ):
            current = report
    return current


def _latest_done_job_ids() -> Subquery:
    return (
        select(Job.study_id, func.max(Job.id).label("job_id"))
        .where(Job.state == JobState.done)
        .group_by(Job.study_id)
        .subquery()
    )


def latest_draft(session: Session, study_id: int) -> Job | None:
    """The study's latest finished draft (None before its first job is done)."""
    return session.scalars(
        select(Job)
        .where(Job.study_id == study_id, Job.state == JobState.done)
        .order_by(Job.id.desc())
        .limit(1)
    ).first()


def consensus_model(result: ModelResult) -> tuple[str, str]:
    """(model hash, model id) under which a draft's agreement is counted: a voted draft
    (self-consistency, k samples) counts as its own model, ``<hash>~k5`` and "<id> (k=5)", so
    a site sees whether k = 5 agrees better than k = 1 in every per-model view."""
    if result.samples == 1:
        return result.model_hash, result.model_id
    return f"{result.model_hash}~k{result.samples}", f"{result.model_id} (k={result.samples})"


def score_study(session: Session, study_id: int, now: datetime | None = None) -> int:
    """Compare a study's chosen report with its latest draft and store the result.

    Replaces the study's agreement rows (none when either half is missing or the report was
    cancelled) and marks its matched reports as scored against the latest draft. Does not
    commit. Returns the number of agreement rows the study now has.
    """
    now = now or utcnow()
    session.scalar(select(Study.id).where(Study.id == study_id).with_for_update())
    reports = list(
        session.scalars(
            select(FinalReport).where(
                FinalReport.study_id == study_id, FinalReport.state == ReportState.matched
            )
        )
    )
    report = chosen_report(reports)
    job = latest_draft(session, study_id)
    for row in reports:
        row.scored_job_id = job.id if job is not None else None
    wanted: dict[str, tuple[str, str]] = {}
    model_hash = model_id = ""
    if report is not None and job is not None and job.result is not None and report.labels:
        result = ModelResult.from_dict(job.result)
        model_hash, model_id = consensus_model(result)
        wanted = {
            finding: (result.findings[finding], str(report.labels.get(finding, "not_mentioned")))
            for finding in FINDINGS
        }
    existing = {
        row.finding: row
        for row in session.scalars(select(Agreement).where(Agreement.study_id == study_id))
    }
    unchanged = (
        report is not None
        and job is not None
        and set(existing) == set(wanted)
        and all(
            row.report_id == report.id
            and row.job_id == job.id
            and (row.ai, row.radiologist) == wanted[finding]
            for finding, row in existing.items()
        )
    )
    if unchanged:
        return len(existing)
    if existing:
        session.execute(delete(Agreement).where(Agreement.study_id == study_id))
        session.flush()
    if not wanted:
        return 0
    assert report is not None and job is not None
    session.add_all(
        Agreement(
            study_id=study_id,
            report_id=report.id,
            job_id=job.id,
            finding=finding,
            ai=ai,
            radiologist=radiologist,
            model_hash=model_hash[:128],
            model_id=model_id[:512],
            reported_at=report.received_at,
            scored_at=now,
        )
        for finding, (ai, radiologist) in wanted.items()
    )
    session.flush()
    return len(wanted)


def score_studies(sessions: sessionmaker, study_ids: Iterable[int]) -> int:
    """Score each study in its own transaction; return how many now have agreement rows.

    Never raises for one study's failure (it is logged; the next sweep tries again).
    """
    scored = 0
    for study_id in dict.fromkeys(study_ids):
        try:
            with sessions() as session:
                rows = score_study(session, study_id)
                session.commit()
        except IntegrityError:  # a concurrent scorer wrote the same rows first
            log.info("study %d was scored concurrently", study_id)
            continue
        except Exception:
            log.exception("scoring study %d failed; the next sweep tries again", study_id)
            continue
        scored += rows > 0
    return scored


class SweepResult(NamedTuple):
    matched: int  # reports that found their study in this sweep
    scored: int  # studies scored (again)


def _matchable(session: Session, since: datetime) -> list[int]:
    """Unmatched reports whose Study Instance UID or accession number a study now has."""
    known = (
        select(Study.id)
        .where(
            or_(
                Study.study_instance_uid == FinalReport.study_instance_uid,
                Study.accession_number == FinalReport.accession_number,
            )
        )
        .exists()
    )
    return list(
        session.scalars(
            select(FinalReport.id)
            .where(
                FinalReport.state == ReportState.unmatched,
                FinalReport.received_at >= since,
                known,
            )
            .order_by(FinalReport.received_at, FinalReport.id)
        )
    )


def _stale_studies(session: Session) -> list[int]:
    """Studies with a matched report not yet scored against their latest finished draft."""
    done = _latest_done_job_ids()
    return list(
        session.scalars(
            select(FinalReport.study_id)
            .join(done, done.c.study_id == FinalReport.study_id)
            .where(
                FinalReport.state == ReportState.matched,
                or_(
                    FinalReport.scored_job_id.is_(None),
                    FinalReport.scored_job_id != done.c.job_id,
                ),
            )
            .distinct()
        )
    )


def sweep(
    sessions: sessionmaker, readers: sessionmaker | None = None, now: datetime | None = None
) -> SweepResult:
    """Match what can now be matched and score what is stale (see the module docstring).

    ``readers`` (a read-only sessionmaker) does the looking, so that nothing is locked when
    there is nothing to do.
    """
    now = now or utcnow()
    since = now - timedelta(days=MATCH_DAYS)
    with (readers or sessions)() as session:
        matchable = _matchable(session, since)
        stale = _stale_studies(session)
        session.rollback()
    matched_studies: list[int] = []
    if matchable:
        with sessions() as session:
            for report_id in matchable:
                report = session.get(FinalReport, report_id)
                if report is None or report.state != ReportState.unmatched:
                    continue
                match = match_study(
                    session, report.study_instance_uid, report.accession_number, report.patient_id
                )
                if match.study_id is None:
                    report.reason = match.reason
                    continue
                report.study_id = match.study_id
                report.state = ReportState.matched
                report.reason = f"matched by {match.reason} after it arrived"
                matched_studies.append(match.study_id)
            session.commit()
    studies = list(dict.fromkeys([*matched_studies, *stale]))
    scored = score_studies(sessions, studies) if studies else 0
    if matched_studies or scored:
        log.info(
            "monitor sweep: %d reports matched, %d studies scored", len(matched_studies), scored
        )
    return SweepResult(len(matched_studies), scored)

"""Agreement between the AI drafts and the radiologists, per finding, model and time window.

The numbers follow the paper's policy as :mod:`model.evaluate` implements it, with the
radiologist's report as the truth and the AI draft as the prediction: a (draft, report) pair
of one finding counts when both labels are definite (present or absent; for ``no_finding`` an
unmentioned label is absent), so uncertain and unmentioned findings are left out and
``pairs`` says how many pairs a number stands on. Sensitivity is TP / (TP + FN), PPV
TP / (TP + FP), specificity TN / (TN + FP), F1 2TP / (2TP + FP + FN) and Cohen's kappa the
chance-corrected agreement of the two 2 x 2 raters; an undefined value is ``None``. 95%
intervals are percentile bootstraps over studies (:func:`model.evaluate.bootstrap_intervals`).

Windows count by when the radiologist's report arrived (``reported_at``): the last N days for
each of ``MONITOR_WINDOWS_DAYS``, and all time. Each model (by the hash of its weights) is
scored on its own, so a new model starts a new series instead of blending into the old one.

These are plain functions over a session, for ``cxrnode monitor``, the admin API and the
Prometheus collector (:mod:`cxrnode.monitor.metrics`). Nothing returned names a patient: a
study is named by its Study Instance UID only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import Agreement, Study, utcnow
from cxrnode.settings import Settings
from model.contracts import FINDINGS
from model.evaluate import Confusion, bootstrap_intervals, confusion, definite

__all__ = [
    "LABELS",
    "MEASURES",
    "PairCounts",
    "confusion_from_counts",
    "disagreements",
    "measures",
    "model_label",
    "pair_counts",
    "summaries",
    "summary",
    "window_name",
]

#: The stored states as the labeler's values (1 present, 0 absent, -1 uncertain, None).
LABELS: dict[str, int | None] = {"present": 1, "absent": 0, "uncertain": -1, "not_mentioned": None}
#: What each row reports, in order; each has a 95% interval when bootstrapped.
MEASURES: tuple[str, ...] = ("sensitivity", "ppv", "specificity", "f1", "kappa")
_EVALUATE_NAMES = {
    "sensitivity": "recall",
    "ppv": "precision",
    "specificity": "specificity",
    "f1": "f1",
    "kappa": "kappa",
}
POLICY = (
    "radiologist's report as truth, AI draft as prediction; per finding over the studies where "
    "both labels are definite (present/absent; no_finding unmentioned counts as absent); "
    "uncertain and unmentioned left out; undefined values are null"
)


def window_name(days: int | None) -> str:
    """The label of a window: "7d", "30d", ... or "all"."""
    return "all" if days is None else f"{days}d"


def model_label(model_hash: str) -> str:
    """The first 16 hex digits of a model hash (an ``algo:`` prefix dropped): a short,
    stable name of a model version for tables and metric labels; a voted setting
    (``<hash>~k5``, :func:`cxrnode.monitor.scoring.consensus_model`) keeps its "~k5"."""
    digits, sep, samples = model_hash.rsplit(":", 1)[-1].partition("~")
    return digits[:16] + (f"~{samples}" if sep else "")


def _since(now: datetime, days: int | None) -> datetime | None:
    return None if days is None else now - timedelta(days=days)


def measures(counts: Confusion) -> dict[str, float | None]:
    """The :data:`MEASURES` of a confusion matrix (``None`` where undefined)."""
    return {
        "sensitivity": counts.recall,
        "ppv": counts.precision,
        "specificity": counts.specificity,
        "f1": counts.f1,
        "kappa": counts.kappa,
    }


def _row(
    window: str, model_hash: str, model_id: str, finding: str, studies: int, counts: Confusion
) -> dict[str, Any]:
    return {
        "window": window,
        "model": model_label(model_hash),
        "model_hash": model_hash,
        "model_id": model_id,
        "finding": finding,
        "studies": studies,
        "pairs": counts.definite,
        "tp": counts.tp,
        "fp": counts.fp,
        "fn": counts.fn,
        "tn": counts.tn,
        **measures(counts),
    }


# ------------------------------------------------------------------------- point estimates


@dataclass(frozen=True)
class PairCounts:
    """How often each (AI, radiologist) state pair occurred for one model and finding."""

    model_hash: str
    model_id: str
    finding: str
    counts: Mapping[tuple[str, str], int]

    @property
    def studies(self) -> int:
        return sum(self.counts.values())


def confusion_from_counts(counts: Mapping[tuple[str, str], int], finding: str) -> Confusion:
    """The definite-pair confusion matrix of counted (AI state, radiologist state) pairs."""
    tp = fp = fn = tn = 0
    for (ai, radiologist), n in counts.items():
        p, t = definite(LABELS[ai], finding), definite(LABELS[radiologist], finding)
        if p is None or t is None:
            continue
        if t == 1 and p == 1:
            tp += n
        elif t == 0 and p == 1:
            fp += n
        elif t == 1 and p == 0:
            fn += n
        else:
            tn += n
    return Confusion(tp, fp, fn, tn, sum(counts.values()))


def pair_counts(session: Session, since: datetime | None = None) -> list[PairCounts]:
    """Counted state pairs per model and finding, from one aggregate query (what the metrics
    collector reads on every scrape)."""
    query = select(
        Agreement.model_hash,
        func.max(Agreement.model_id),
        Agreement.finding,
        Agreement.ai,
        Agreement.radiologist,
        func.count(),
    ).group_by(Agreement.model_hash, Agreement.finding, Agreement.ai, Agreement.radiologist)
    if since is not None:
        query = query.where(Agreement.reported_at >= since)
    grouped: dict[tuple[str, str], dict[tuple[str, str], int]] = defaultdict(dict)
    model_ids: dict[str, str] = {}
    for model_hash, model_id, finding, ai, radiologist, n in session.execute(query):
        grouped[(model_hash, finding)][(ai, radiologist)] = n
        model_ids[model_hash] = model_id
    return [
        PairCounts(model_hash, model_ids[model_hash], finding, counts)
        for (model_hash, finding), counts in sorted(grouped.items(), key=_finding_order)
    ]


def _finding_order(item: tuple[tuple[str, str], Any]) -> tuple[str, int]:
    (model_hash, finding), _ = item
    return model_hash, FINDINGS.index(finding) if finding in FINDINGS else len(FINDINGS)


# -------------------------------------------------------------------------------- summary


def _studies_by_model(
    session: Session, since: datetime | None
) -> dict[str, tuple[str, dict[int, dict[str, tuple[str, str]]]]]:
    query = select(
        Agreement.model_hash,
        Agreement.model_id,
        Agreement.study_id,
        Agreement.finding,
        Agreement.ai,
        Agreement.radiologist,
    )
    if since is not None:
        query = query.where(Agreement.reported_at >= since)
    models: dict[str, tuple[str, dict[int, dict[str, tuple[str, str]]]]] = {}
    for model_hash, model_id, study_id, finding, ai, radiologist in session.execute(query):
        _, studies = models.setdefault(model_hash, (model_id, {}))
        studies.setdefault(study_id, {})[finding] = (ai, radiologist)
    return models


def agreement_rows(
    models: Mapping[str, tuple[str, Mapping[int, Mapping[str, tuple[str, str]]]]],
    window: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of the agreement table from per-study states (pure; see the module docstring)."""
    out: list[dict[str, Any]] = []
    for model_hash in sorted(models):
        model_id, studies = models[model_hash]
        order = sorted(studies)
        truth = {
            f: [LABELS[studies[s].get(f, ("not_mentioned",) * 2)[1]] for s in order]
            for f in FINDINGS
        }
        predicted = {
            f: [LABELS[studies[s].get(f, ("not_mentioned",) * 2)[0]] for s in order]
            for f in FINDINGS
        }
        intervals: dict[str, dict[str, Any]] = {}
        if resamples and order:
            intervals, _ = bootstrap_intervals(
                truth,
                predicted,
                FINDINGS,
                resamples=resamples,
                seed=seed,
                measures=tuple(_EVALUATE_NAMES.values()),
            )
        for finding in FINDINGS:
            counts = confusion(truth[finding], predicted[finding], finding)
            row = _row(window, model_hash, model_id, finding, len(order), counts)
            for measure in MEASURES:
                interval = intervals.get(finding, {}).get(_EVALUATE_NAMES[measure])
                row[f"{measure}_ci"] = None if interval is None else list(interval)
            out.append(row)
    return out


def summary(
    session: Session,
    settings: Settings | None = None,
    window_days: int | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """AI-radiologist agreement over the last ``window_days`` days (None: all time).

    Returns a JSON-ready dict: ``window``, ``window_days``, ``since``, ``until``, ``studies``
    (compared studies in the window), ``policy``, ``bootstrap`` and ``rows``: one per model and
    finding with ``studies``, ``pairs``, ``tp``/``fp``/``fn``/``tn``, ``sensitivity``, ``ppv``,
    ``specificity``, ``f1``, ``kappa`` and a ``<measure>_ci`` [low, high] for each (null when
    undefined or not bootstrapped). ``settings`` is accepted for the web app's convenience and
    not needed for one window.
    """
    now = now or utcnow()
    since = _since(now, window_days)
    models = _studies_by_model(session, since)
    window = window_name(window_days)
    return {
        "window": window,
        "window_days": window_days,
        "since": since.isoformat() if since else None,
        "until": now.isoformat(),
        "studies": sum(len(studies) for _, studies in models.values()),
        "policy": POLICY,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "study"},
        "rows": agreement_rows(models, window, resamples=resamples, seed=seed),
    }


def summaries(
    session: Session,
    settings: Settings,
    *,
    resamples: int = 1000,
    seed: int = 0,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """:func:`summary` for each configured window (``MONITOR_WINDOWS_DAYS``) and all time."""
    now = now or utcnow()
    windows: Sequence[int | None] = [*settings.monitor_windows_days, None]
    return [
        summary(session, settings, days, resamples=resamples, seed=seed, now=now)
        for days in windows
    ]


# ------------------------------------------------------------------------- error analysis


def disagreements(
    session: Session,
    *,
    window_days: int | None = None,
    finding: str | None = None,
    model_hash: str | None = None,
    limit: int = 100,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Studies where the draft and the radiologist definitely disagree on a finding, newest
    report first: ``ai_only`` (the draft says present, the radiologist absent) or
    ``radiologist_only``. For error analysis: each names the study by its UID and the report
    row (``report_id``) whose text the radiologist wrote."""
    if finding is not None and finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; choose from {list(FINDINGS)}")
    now = now or utcnow()
    query = (
        select(Agreement, Study.study_instance_uid)
        .join(Study, Study.id == Agreement.study_id)
        .where(Agreement.ai != Agreement.radiologist)
        .order_by(Agreement.reported_at.desc(), Agreement.study_id, Agreement.id)
    )
    since = _since(now, window_days)
    if since is not None:
        query = query.where(Agreement.reported_at >= since)
    if finding is not None:
        query = query.where(Agreement.finding == finding)
    if model_hash is not None:
        query = query.where(Agreement.model_hash.startswith(model_hash))
    out: list[dict[str, Any]] = []
    for row, study_uid in _definite_disagreements(session.execute(query)):
        out.append(
            {
                "study_instance_uid": study_uid,
                "finding": row.finding,
                "ai": row.ai,
                "radiologist": row.radiologist,
                "kind": "ai_only" if LABELS[row.ai] == 1 else "radiologist_only",
                "model": model_label(row.model_hash),
                "report_id": row.report_id,
                "job_id": row.job_id,
                "reported_at": row.reported_at.isoformat(),
            }
        )
        if len(out) >= limit:
            break
    return out


def _definite_disagreements(rows: Iterable[Any]) -> Iterable[tuple[Agreement, str]]:
    for row, study_uid in rows:
        ai = definite(LABELS[row.ai], row.finding)
        radiologist = definite(LABELS[row.radiologist], row.finding)
        if ai is not None and radiologist is not None and ai != radiologist:
            yield row, study_uid

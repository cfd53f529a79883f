"""Per-finding precision, recall and F1 of generated reports, scored as in the CXR-LLaVA paper.

The paper (arXiv v3 / Eur Radiol 2025) labels both the generated and the reference report with
the CheXpert labeler and computes, per finding, F1 over the studies where *both* labels are
definite (0 or 1); uncertain and unmentioned labels are left out, and 95% confidence intervals
come from 1,000 bootstrap resamples. This module does the same with :mod:`model.labeler`:

- :func:`confusion`, :func:`finding_metrics`, :func:`bootstrap_intervals` and :func:`evaluate`
  are pure functions over label lists (1, 0, -1 or ``None``);
- :func:`read_table` and :func:`run` are the thin runner behind ``cxrnode eval``: they read a CSV
  of images (or report texts) with ground-truth columns, obtain the generated reports through a
  callable the caller supplies, label them, and score them.

Policy details, chosen so that nothing undefined is silently counted as a miss:

- **Definite pairs only.** A (truth, prediction) pair counts when both are 0 or 1. ``coverage``
  is definite pairs / rows, so a reader sees how much of the set a number stands on.
- **No finding** is 1-or-blank in CheXpert (and in our labeler), never 0, so for that column
  blank means 0 on both sides; -1 is still excluded.
- **Undefined ratios are** ``None`` **(JSON null)**, not 0: precision without predicted positives,
  recall without true positives, F1 when there is no positive on either side
  (F1 = 2TP / (2TP + FP + FN)). The mean F1 averages the pathology findings (not ``no_finding``)
  whose F1 is defined, and says which those were.
- **Bootstrap**: rows are resampled with replacement (all findings together, so the mean F1 gets
  an interval too); the interval is the 2.5th and 97.5th percentile of the resampled values
  that are defined, from a seeded ``numpy`` generator, so a seed gives the same interval.
- **Agreement** (used by the node's monitoring of AI drafts against radiologists' reports):
  specificity TN / (TN + FP) and Cohen's kappa over the same definite pairs, for two raters
  and two categories: kappa = (p_o - p_e) / (1 - p_e) with the observed agreement
  p_o = (TP + TN) / n and the chance agreement p_e from the raters' marginals; undefined when
  p_e = 1 (both raters gave one and the same category to every pair) or n = 0.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.labeler import FINDINGS, PATHOLOGIES, label_report

__all__ = [
    "MEASURES",
    "Confusion",
    "EvaluationResult",
    "EvaluationRun",
    "FindingMetrics",
    "Interval",
    "bootstrap_intervals",
    "cohen_kappa",
    "confusion",
    "definite",
    "evaluate",
    "finding_metrics",
    "format_table",
    "generate_reports",
    "parse_label",
    "read_table",
    "run",
]

Label = int | None
Interval = tuple[float, float]

_BLANKS = frozenset({"", "nan", "na", "n/a", "none", "null"})
_BOOTSTRAP_BLOCK = 100  # resamples drawn at once; bounds memory at 100 x rows counts
#: What :func:`bootstrap_intervals` can resample; precision, recall and F1 are its default.
MEASURES: tuple[str, ...] = ("precision", "recall", "f1", "specificity", "kappa")


def parse_label(value: str | float | int | None) -> Label:
    """Read one ground-truth cell: 1 / 0 / -1 (also "1.0" etc.), blank or NaN -> ``None``.

    Raises
    ------
    ValueError
        For anything else, naming the value, so the caller can say which cell it was.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    if text.lower() in _BLANKS:
        return None
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number in (1.0, 0.0, -1.0):
        return int(number)
    raise ValueError(f"expected a label 1, 0, -1 or blank, found {text!r}")


def _definite(value: Label, finding: str) -> int | None:
    """The value a pair contributes (0/1), or ``None`` when the pair is excluded."""
    if finding == "no_finding" and value is None:
        return 0
    return value if value in (0, 1) else None


def definite(value: Label, finding: str) -> int | None:
    """The value one label contributes to a pair (0 or 1), or ``None`` when the pair is left
    out: uncertain and unmentioned labels, except that ``no_finding`` blank counts as 0."""
    return _definite(value, finding)


@dataclass(frozen=True)
class Confusion:
    """Counts over the definite pairs of one finding, and the number of rows considered."""

    tp: int
    fp: int
    fn: int
    tn: int
    rows: int

    @property
    def definite(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def coverage(self) -> float | None:
        return self.definite / self.rows if self.rows else None

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def kappa(self) -> float | None:
        return cohen_kappa(self.tp, self.fp, self.fn, self.tn)


def cohen_kappa(tp: int, fp: int, fn: int, tn: int) -> float | None:
    """Cohen's kappa of two raters on a 2 x 2 table (truth positive/negative by predicted
    positive/negative); ``None`` when it is undefined (no pairs, or chance agreement 1)."""
    n = tp + fp + fn + tn
    if n == 0:
        return None
    observed = (tp + tn) / n
    chance = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def confusion(truth: Sequence[Label], predicted: Sequence[Label], finding: str) -> Confusion:
    """Count TP/FP/FN/TN over the pairs where both labels are definite (see module docstring)."""
    if len(truth) != len(predicted):
        raise ValueError(
            f"truth and predictions must pair up row by row; got {len(truth)} truth labels "
            f"and {len(predicted)} predictions for {finding}"
        )
    tp = fp = fn = tn = 0
    for t_raw, p_raw in zip(truth, predicted, strict=True):
        t, p = _definite(t_raw, finding), _definite(p_raw, finding)
        if t is None or p is None:
            continue
        if t == 1 and p == 1:
            tp += 1
        elif t == 0 and p == 1:
            fp += 1
        elif t == 1 and p == 0:
            fn += 1
        else:
            tn += 1
    return Confusion(tp, fp, fn, tn, len(truth))


@dataclass(frozen=True)
class FindingMetrics:
    """Point estimates for one finding and, if bootstrapped, their 95% intervals."""

    finding: str
    counts: Confusion
    intervals: Mapping[str, Interval | None] = field(default_factory=dict)

    @property
    def precision(self) -> float | None:
        return self.counts.precision

    @property
    def recall(self) -> float | None:
        return self.counts.recall

    @property
    def f1(self) -> float | None:
        return self.counts.f1

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "tp": c.tp,
            "fp": c.fp,
            "fn": c.fn,
            "tn": c.tn,
            "definite": c.definite,
            "rows": c.rows,
            "coverage": c.coverage,
            "precision": c.precision,
            "recall": c.recall,
            "f1": c.f1,
            "precision_ci": _interval_json(self.intervals.get("precision")),
            "recall_ci": _interval_json(self.intervals.get("recall")),
            "f1_ci": _interval_json(self.intervals.get("f1")),
        }


def _interval_json(interval: Interval | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def finding_metrics(
    truth: Sequence[Label], predicted: Sequence[Label], finding: str
) -> FindingMetrics:
    """Point estimates for one finding, without intervals."""
    return FindingMetrics(finding, confusion(truth, predicted, finding))


def _outcome_vectors(
    truth: Sequence[Label], predicted: Sequence[Label], finding: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-row 0/1 indicators of TP, FP, FN and TN (excluded pairs are 0 in all four)."""
    tp = np.zeros(len(truth), dtype=np.int64)
    fp = np.zeros(len(truth), dtype=np.int64)
    fn = np.zeros(len(truth), dtype=np.int64)
    tn = np.zeros(len(truth), dtype=np.int64)
    for i, (t_raw, p_raw) in enumerate(zip(truth, predicted, strict=True)):
        t, p = _definite(t_raw, finding), _definite(p_raw, finding)
        if t is None or p is None:
            continue
        tp[i] = t == 1 and p == 1
        fp[i] = t == 0 and p == 1
        fn[i] = t == 1 and p == 0
        tn[i] = t == 0 and p == 0
    return tp, fp, fn, tn


def _kappa_vector(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """:func:`cohen_kappa` over arrays of counts (NaN where undefined)."""
    n = (tp + fp + fn + tn).astype(float)
    observed = _safe_divide((tp + tn).astype(float), n)
    chance = _safe_divide(((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)).astype(float), n * n)
    out = np.full(n.shape, np.nan)
    defined = (n > 0) & (chance < 1.0)
    np.divide(observed - chance, 1.0 - chance, out=out, where=defined)
    return out


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _percentile_interval(values: np.ndarray, level: float) -> Interval | None:
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(defined, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_intervals(
    truth: Mapping[str, Sequence[Label]],
    predicted: Mapping[str, Sequence[Label]],
    findings: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    mean_over: Sequence[str] | None = None,
    measures: Sequence[str] = ("precision", "recall", "f1"),
) -> tuple[dict[str, dict[str, Interval | None]], Interval | None]:
    """Percentile bootstrap intervals of precision, recall and F1 per finding, and of mean F1.

    Rows are resampled with replacement, all findings together; ``mean_over`` names the findings
    whose F1 the mean averages (default: every pathology among ``findings``). ``measures``
    chooses what gets an interval, from :data:`MEASURES` (specificity and Cohen's kappa too);
    the resamples drawn do not depend on it, so a seed gives the same F1 interval either way.

    Returns
    -------
    (intervals, mean_f1_interval)
        ``intervals[finding]`` maps each of ``measures`` to ``(low, high)``, or ``None`` when
        no resample defines the value.
    """
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measures {unknown}; choose from {list(MEASURES)}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie between 0 and 1, got {level}")
    rows = {len(truth[f]) for f in findings} | {len(predicted[f]) for f in findings}
    if len(rows) != 1:
        raise ValueError(f"every finding needs the same number of rows, got lengths {sorted(rows)}")
    n = rows.pop()
    if mean_over is None:
        mean_over = [f for f in findings if f in PATHOLOGIES]
    empty: dict[str, dict[str, Interval | None]] = {f: dict.fromkeys(measures) for f in findings}
    if n == 0:
        return empty, None
    vectors = {f: _outcome_vectors(truth[f], predicted[f], f) for f in findings}
    rng = np.random.default_rng(seed)
    uniform = np.full(n, 1.0 / n)
    samples: dict[str, dict[str, list[np.ndarray]]] = {
        f: {m: [] for m in measures} for f in findings
    }
    means: list[np.ndarray] = []
    done = 0
    while done < resamples:
        block = min(_BOOTSTRAP_BLOCK, resamples - done)
        # counts[b, i]: how often row i was drawn in resample b (multinomial = draws with
        # replacement), so each sum below is a resampled TP/FP/FN count.
        counts = rng.multinomial(n, uniform, size=block)
        f1_block = []
        for f in findings:
            tp_vec, fp_vec, fn_vec, tn_vec = vectors[f]
            tp, fp, fn = counts @ tp_vec, counts @ fp_vec, counts @ fn_vec
            f1 = _safe_divide(2 * tp, 2 * tp + fp + fn)
            resampled = samples[f]
            if "precision" in resampled:
                resampled["precision"].append(_safe_divide(tp, tp + fp))
            if "recall" in resampled:
                resampled["recall"].append(_safe_divide(tp, tp + fn))
            if "f1" in resampled:
                resampled["f1"].append(f1)
            if "specificity" in resampled or "kappa" in resampled:
                tn = counts @ tn_vec
                if "specificity" in resampled:
                    resampled["specificity"].append(_safe_divide(tn, tn + fp))
                if "kappa" in resampled:
                    resampled["kappa"].append(_kappa_vector(tp, fp, fn, tn))
            if f in mean_over:
                f1_block.append(f1)
        if f1_block:
            stacked = np.vstack(f1_block)
            defined = ~np.isnan(stacked)
            total = np.where(defined, stacked, 0.0).sum(axis=0)
            count = defined.sum(axis=0)
            means.append(_safe_divide(total, count.astype(float)))
        done += block
    intervals = {
        f: {k: _percentile_interval(np.concatenate(v), level) for k, v in samples[f].items()}
        for f in findings
    }
    mean_interval = _percentile_interval(np.concatenate(means), level) if means else None
    return intervals, mean_interval


@dataclass(frozen=True)
class EvaluationResult:
    """Everything ``cxrnode eval`` reports; :meth:`to_dict` is its JSON."""

    rows: int
    findings: tuple[FindingMetrics, ...]
    mean_f1: float | None
    mean_f1_findings: tuple[str, ...]
    mean_f1_ci: Interval | None
    resamples: int
    seed: int
    level: float = 0.95

    def by_name(self) -> dict[str, FindingMetrics]:
        return {m.finding: m for m in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "policy": (
                "per-finding precision/recall/F1 over pairs where both the ground truth and the "
                "label of the generated report are definite (0 or 1); uncertain (-1) and blank "
                "excluded; no_finding blank counts as 0; undefined ratios are null"
            ),
            "bootstrap": {
                "resamples": self.resamples,
                "seed": self.seed,
                "level": self.level,
                "method": "percentile, rows resampled with replacement",
            },
            "findings": {m.finding: m.to_dict() for m in self.findings},
            "mean_f1": self.mean_f1,
            "mean_f1_ci": _interval_json(self.mean_f1_ci),
            "mean_f1_findings": list(self.mean_f1_findings),
        }


def evaluate(
    truth: Mapping[str, Sequence[Label]],
    predicted: Mapping[str, Sequence[Label]],
    findings: Sequence[str] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> EvaluationResult:
    """Score predicted labels against ground truth for each finding in ``truth``.

    Parameters
    ----------
    truth, predicted
        finding name -> one label per row (1, 0, -1 or ``None``), rows in the same order.
    findings
        Which findings to score, in output order; default: those of :data:`FINDINGS` that
        ``truth`` has.
    resamples
        Bootstrap resamples; 0 skips the intervals.
    """
    if findings is None:
        findings = [f for f in FINDINGS if f in truth]
    missing = [f for f in findings if f not in truth or f not in predicted]
    if missing:
        raise ValueError(
            f"no labels for {missing}; truth has {sorted(truth)}, predictions have {sorted(predicted)}"
        )
    if resamples < 0:
        raise ValueError(f"resamples must be 0 or more, got {resamples}")
    metrics = [finding_metrics(truth[f], predicted[f], f) for f in findings]
    rows = metrics[0].counts.rows if metrics else 0
    averaged = tuple(m.finding for m in metrics if m.finding in PATHOLOGIES and m.f1 is not None)
    mean_f1 = (
        sum(m.f1 for m in metrics if m.finding in averaged and m.f1 is not None) / len(averaged)
        if averaged
        else None
    )
    mean_ci: Interval | None = None
    if resamples and findings:
        intervals, mean_ci = bootstrap_intervals(
            truth,
            predicted,
            findings,
            resamples=resamples,
            seed=seed,
            level=level,
            mean_over=averaged,
        )
        metrics = [FindingMetrics(m.finding, m.counts, intervals[m.finding]) for m in metrics]
        if not averaged:
            mean_ci = None
    return EvaluationResult(
        rows=rows,
        findings=tuple(metrics),
        mean_f1=mean_f1,
        mean_f1_findings=averaged,
        mean_f1_ci=mean_ci,
        resamples=resamples,
        seed=seed,
        level=level,
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval_cell(interval: Interval | None) -> str:
    return "-" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"


def format_table(result: EvaluationResult) -> str:
    """A fixed-width table: one line per finding, then the mean F1."""
    header = (
        f"{'finding':<18}{'rows':>6}{'definite':>10}{'coverage':>10}{'TP':>6}{'FP':>6}{'FN':>6}"
        f"{'TN':>6}{'precision':>11}{'recall':>8}{'F1':>7}  {'F1 95% CI':<13}"
    )
    lines = [header]
    for m in result.findings:
        c = m.counts
        lines.append(
            f"{m.finding:<18}{c.rows:>6}{c.definite:>10}{_cell(c.coverage):>10}{c.tp:>6}{c.fp:>6}"
            f"{c.fn:>6}{c.tn:>6}{_cell(c.precision):>11}{_cell(c.recall):>8}{_cell(c.f1):>7}  "
            f"{_interval_cell(m.intervals.get('f1')):<13}"
        )
    names = ", ".join(result.mean_f1_findings) or "none defined"
    lines.append(
        f"mean F1 over {len(result.mean_f1_findings)} findings ({names}): {_cell(result.mean_f1)}"
        f"  95% CI {_interval_cell(result.mean_f1_ci)}"
    )
    if result.resamples:
        lines.append(
            f"intervals: {result.resamples} bootstrap resamples, seed {result.seed}, percentile"
        )
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# The runner behind `cxrnode eval`
# --------------------------------------------------------------------------------------------


def _column_key(name: str) -> str:
    """CheXpert-style headers ("Pleural Effusion", "No Finding") map to our names."""
    return "_".join(name.strip().lower().replace("-", " ").split())


@dataclass(frozen=True)
class Table:
    """The evaluation CSV, read: ground truth per finding and the raw rows."""

    path: Path
    rows: list[dict[str, str]]
    truth: dict[str, list[Label]]


def read_table(path: Path, *, need: Sequence[str] = ()) -> Table:
    """Read an evaluation CSV: columns named like findings (1/0/-1/blank) plus ``need``.

    Raises
    ------
    ValueError
        When the file has no finding column, lacks a needed column, or holds a cell that is not
        a label; the message names the column and the 1-based data row.
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        rows = list(reader)
    by_key = {_column_key(name): name for name in header}
    columns = {f: by_key[f] for f in FINDINGS if f in by_key}
    if not columns:
        raise ValueError(
            f"{path}: no ground-truth column; expected one or more of {', '.join(FINDINGS)} "
            f"(CheXpert spellings such as 'Pleural Effusion' work too), found {header}"
        )
    absent = [name for name in need if name not in header]
    if absent:
        raise ValueError(f"{path}: missing column(s) {absent}; the header is {header}")
    truth: dict[str, list[Label]] = {f: [] for f in columns}
    for number, row in enumerate(rows, start=1):
        for finding, column in columns.items():
            try:
                truth[finding].append(parse_label(row.get(column)))
            except ValueError as exc:
                raise ValueError(f"{path}: row {number}, column {column!r}: {exc}") from None
    return Table(path, rows, truth)


def resolve_image(table_path: Path, value: str) -> Path:
    """An ``image`` cell as a path: absolute as given, else relative to the CSV's folder."""
    path = Path(value.strip())
    return path if path.is_absolute() else table_path.parent / path


@dataclass(frozen=True)
class EvaluationRun:
    """A scored run: the metrics and, per row, the report text and both label sets."""

    result: EvaluationResult
    reports: list[str]
    predicted: dict[str, list[Label]]
    truth: dict[str, list[Label]]
    rows: list[dict[str, str]]
    model: Mapping[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.result.to_dict()
        out["model"] = dict(self.model) if self.model is not None else None
        out["per_row"] = [
            {
                "row": i + 1,
                **({"image": row["image"]} if "image" in row else {}),
                "report": self.reports[i],
                "predicted": {f: self.predicted[f][i] for f in self.predicted},
                "truth": {f: self.truth[f][i] for f in self.truth},
            }
            for i, row in enumerate(self.rows)
        ]
        return out


def run(
    table: Table,
    reports: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    model: Mapping[str, str] | None = None,
    labeler: Callable[[str], Mapping[str, Label]] = label_report,
) -> EvaluationRun:
    """Label the generated ``reports`` (one per table row) and score them against the table."""
    if len(reports) != len(table.rows):
        raise ValueError(f"expected one report per row ({len(table.rows)}), got {len(reports)}")
    labelled = [labeler(text) for text in reports]
    predicted = {f: [labels[f] for labels in labelled] for f in table.truth}
    result = evaluate(table.truth, predicted, resamples=resamples, seed=seed)
    return EvaluationRun(result, list(reports), predicted, table.truth, table.rows, model)


def generate_reports(
    engine: Any,
    items: Iterable[tuple[np.ndarray, Any]],
    *,
    batch_size: int = 8,
    seed: int | None = None,
    **generate_options: Any,
) -> list[str]:
    """Run ``engine.generate`` over (image, context) pairs in batches; the first answers, in order.

    ``engine`` is a ``model.pipeline.ReportEngine`` (anything with its ``generate``); ``items``
    may be a generator, so images are decoded one batch at a time. ``generate_options`` (e.g.
    ``max_new_tokens``) pass through to ``generate``; its defaults are the paper's settings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts: list[str] = []
    batch: list[tuple[np.ndarray, Any]] = []

    def flush() -> None:
        images = [image for image, _ in batch]
        contexts = [context for _, context in batch]
        results = engine.generate(images, contexts, seed=seed, **generate_options)
        texts.extend(result.report for result in results)
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return texts

"""Labeler benchmark: score ``model.labeler.label_report`` against a labelled report CSV.

The CSV has the columns ``id,report_text,<findings...>``; a finding cell is ``1`` when the
finding is coded present and blank (or ``0``/``-1``) otherwise. Scoring is positive-vs-rest per
finding: a prediction of 1 against anything else, a label of 1 against anything else. The table
gives, per finding, the positives, TP/FP/FN, precision, recall and F1; then the macro-F1 over
the findings with at least ``--min-positives`` positives (5) and the micro-F1 over those same
findings; the last line is the same figures as one JSON object.

Run::

    .venv/bin/python bench/labeler.py PATH.csv
    .venv/bin/python bench/labeler.py PATH.csv --split 1/3 --seed 0        # score fold 1 only
    .venv/bin/python bench/labeler.py PATH.csv --split 1/3 --seed 0 --rest # all but fold 1
    .venv/bin/python bench/labeler.py PATH.csv --errors pneumonia          # print the misses

Folds are a seeded random partition of the rows (``--seed``), numbered 1..N. ``--errors``
prints each false positive and false negative report of one finding, with the mentions the
labeler found for it, to stdout; it is for reading on a terminal, not for storing.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.labeler import FINDINGS, find_mentions, label_report  # noqa: E402


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    truth: dict[str, bool]


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """Rows of the CSV and the finding columns it has (in :data:`FINDINGS` order)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for needed in ("id", "report_text"):
            if needed not in header:
                raise SystemExit(f"{path}: no {needed!r} column; the header is {header}")
        findings = [f for f in FINDINGS if f in header]
        if not findings:
            raise SystemExit(f"{path}: no finding column; expected some of {', '.join(FINDINGS)}")
        rows = [
            Row(
                row["id"],
                row["report_text"] or "",
                {f: (row.get(f) or "").strip() in ("1", "1.0") for f in findings},
            )
            for row in reader
        ]
    return rows, findings


def select_fold(rows: list[Row], split: str, seed: int, rest: bool) -> list[Row]:
    """Fold K of N (``split`` = "K/N") of a seeded random partition, or all other folds."""
    try:
        k_text, n_text = split.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise SystemExit(f"--split wants K/N such as 1/3, got {split!r}") from None
    if not 1 <= k <= n:
        raise SystemExit(f"--split {split}: K must be between 1 and N")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    fold_of = {index: position % n + 1 for position, index in enumerate(order)}
    return [row for i, row in enumerate(rows) if (fold_of[i] == k) != rest]


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def score(
    rows: Sequence[Row],
    predictions: Sequence[dict[str, int | None]],
    findings: Sequence[str],
    min_positives: int = 5,
) -> dict[str, Any]:
    """Positive-vs-rest counts and ratios per finding, macro-F1 and micro-F1."""
    per: dict[str, dict[str, Any]] = {}
    for finding in findings:
        tp = fp = fn = 0
        for row, predicted in zip(rows, predictions, strict=True):
            truth, guess = row.truth[finding], predicted[finding] == 1
            tp += truth and guess
            fp += guess and not truth
            fn += truth and not guess
        per[finding] = {
            "positives": tp + fn,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        }
    scored = [f for f in findings if per[f]["positives"] >= min_positives]
    f1s = [per[f]["f1"] or 0.0 for f in scored]
    tp = sum(per[f]["tp"] for f in scored)
    fp = sum(per[f]["fp"] for f in scored)
    fn = sum(per[f]["fn"] for f in scored)
    return {
        "reports": len(rows),
        "findings": per,
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "micro_f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "macro_over": scored,
        "min_positives": min_positives,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'finding':<18}{'pos':>6}{'TP':>6}{'FP':>6}{'FN':>6}{'prec':>8}{'recall':>8}{'F1':>8}"
    ]
    for name, m in result["findings"].items():
        mark = "" if name in result["macro_over"] else "  (not in macro: < min positives)"
        lines.append(
            f"{name:<18}{m['positives']:>6}{m['tp']:>6}{m['fp']:>6}{m['fn']:>6}"
            f"{_cell(m['precision']):>8}{_cell(m['recall']):>8}{_cell(m['f1']):>8}{mark}"
        )
    lines.append(
        f"macro-F1 {_cell(result['macro_f1'])} over {len(result['macro_over'])} findings with >= "
        f"{result['min_positives']} positives; micro-F1 {_cell(result['micro_f1'])}; "
        f"{result['reports']} reports"
    )
    return "\n".join(lines)


def print_errors(
    rows: Sequence[Row], predictions: Sequence[dict[str, int | None]], finding: str
) -> None:
    for kind in ("FP", "FN"):
        for row, predicted in zip(rows, predictions, strict=True):
            truth, guess = row.truth[finding], predicted[finding] == 1
            if (kind == "FP" and guess and not truth) or (kind == "FN" and truth and not guess):
                mentions = [
                    f"{m.text!r}={m.label}{list(m.cues) if m.cues else ''}"
                    for m in find_mentions(row.text)
                    if m.finding == finding
                ]
                print(f"--- {kind} {row.id} predicted={predicted[finding]} mentions={mentions}")
                print(row.text.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="CSV with id, report_text and finding columns")
    parser.add_argument("--split", help="K/N: score only fold K of N (seeded random partition)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold partition (0)")
    parser.add_argument("--rest", action="store_true", help="with --split: all folds except K")
    parser.add_argument("--errors", metavar="FINDING", help="print the misclassified reports")
    parser.add_argument("--min-positives", type=int, default=5)
    args = parser.parse_args(argv)

    rows, findings = read_rows(args.path)
    if args.split:
        rows = select_fold(rows, args.split, args.seed, args.rest)
    elif args.rest:
        parser.error("--rest needs --split")
    if args.errors and args.errors not in findings:
        parser.error(f"--errors: {args.errors!r} is not one of {', '.join(findings)}")

    started = time.perf_counter()
    predictions = [label_report(row.text) for row in rows]
    seconds = time.perf_counter() - started

    if args.errors:
        print_errors(rows, predictions, args.errors)
    result = score(rows, predictions, findings, args.min_positives)
    result["seconds"] = round(seconds, 3)
    if args.split:
        result["split"] = {"fold": args.split, "seed": args.seed, "rest": args.rest}
    print(format_table(result))
    print(f"labelled {len(rows)} reports in {seconds:.2f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

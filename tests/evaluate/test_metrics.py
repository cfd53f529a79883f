"""The paper's scoring: definite pairs only, hand-checked counts and ratios, seeded bootstrap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from model.evaluate import (
    Confusion,
    bootstrap_intervals,
    confusion,
    evaluate,
    format_table,
    parse_label,
    read_table,
    run,
)
from model.labeler import FINDINGS

# A fixed confusion matrix, written out by hand. Rows 0-9 are definite pairs:
#   rows 0-2  truth 1, predicted 1   -> TP = 3
#   rows 3-4  truth 1, predicted 0   -> FN = 2
#   row  5    truth 0, predicted 1   -> FP = 1
#   rows 6-9  truth 0, predicted 0   -> TN = 4
# Rows 10-14 are excluded: truth -1, truth blank, predicted -1, predicted blank, both blank.
TRUTH = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, -1, None, 1, 0, None]
PRED = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, -1, None, None]
# precision = TP / (TP + FP) = 3 / 4 = 0.75
# recall    = TP / (TP + FN) = 3 / 5 = 0.6
# F1        = 2 * 0.75 * 0.6 / (0.75 + 0.6) = 0.9 / 1.35 = 2 / 3
# coverage  = 10 definite pairs / 15 rows


def test_counts_and_ratios_match_the_hand_computed_confusion_matrix() -> None:
    c = confusion(TRUTH, PRED, "edema")
    assert (c.tp, c.fp, c.fn, c.tn, c.rows) == (3, 1, 2, 4, 15)
    assert c.precision == pytest.approx(0.75)
    assert c.recall == pytest.approx(0.6)
    assert c.f1 == pytest.approx(2 / 3)
    assert c.coverage == pytest.approx(10 / 15)


def test_uncertain_and_blank_pairs_are_excluded_not_counted_as_negative() -> None:
    # Only the excluded rows: nothing is counted, whatever the other side says.
    c = confusion(TRUTH[10:], PRED[10:], "edema")
    assert (c.tp, c.fp, c.fn, c.tn, c.definite) == (0, 0, 0, 0, 0)
    assert c.coverage == 0.0
    # Turning an uncertain prediction into a negative one would change the counts.
    assert confusion([1], [-1], "edema").fn == 0
    assert confusion([1], [0], "edema").fn == 1


def test_no_finding_blank_counts_as_zero_on_both_sides() -> None:
    c = confusion([1, None, 1, None], [1, 1, None, None], "no_finding")
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 1)
    assert confusion([-1], [1], "no_finding").definite == 0


def test_undefined_ratios_are_none_not_zero() -> None:
    negatives = Confusion(tp=0, fp=0, fn=0, tn=5, rows=5)
    assert (negatives.precision, negatives.recall, negatives.f1) == (None, None, None)
    missed = confusion([1, 1], [0, 0], "edema")
    assert (missed.precision, missed.recall, missed.f1) == (None, 0.0, 0.0)
    assert Confusion(0, 0, 0, 0, 0).coverage is None


def test_confusion_refuses_lists_that_do_not_pair_up() -> None:
    with pytest.raises(ValueError, match="row by row"):
        confusion([1, 0], [1], "edema")


@pytest.mark.parametrize(
    ("cell", "value"),
    [
        ("1", 1),
        ("1.0", 1),
        (" 0 ", 0),
        ("0.0", 0),
        ("-1", -1),
        ("-1.0", -1),
        ("", None),
        ("nan", None),
        (None, None),
        (float("nan"), None),
        (1, 1),
    ],
)
def test_ground_truth_cells_parse_like_chexpert_csvs(cell: object, value: int | None) -> None:
    assert parse_label(cell) == value  # type: ignore[arg-type]


@pytest.mark.parametrize("cell", ["2", "yes", "0.5", "positive"])
def test_ground_truth_cells_that_are_not_labels_are_refused(cell: str) -> None:
    with pytest.raises(ValueError, match="expected a label"):
        parse_label(cell)


def _dataset(rows: int = 60, seed: int = 1) -> tuple[dict, dict]:
    """Labels for two findings with a mix of agreement, disagreement and exclusions."""
    rng = np.random.default_rng(seed)
    values = [1, 0, -1, None]
    truth, pred = {}, {}
    for finding, p_flip in (("edema", 0.2), ("pneumothorax", 0.35)):
        t = [values[i] for i in rng.choice(4, size=rows, p=[0.4, 0.4, 0.1, 0.1])]
        p = [
            (1 - v if v in (0, 1) and rng.random() < p_flip else v) if rng.random() > 0.05 else None
            for v in t
        ]
        truth[finding], pred[finding] = t, p
    return truth, pred


def test_bootstrap_interval_contains_the_point_estimate() -> None:
    truth, pred = _dataset()
    result = evaluate(truth, pred, resamples=1000, seed=0)
    for m in result.findings:
        for name in ("precision", "recall", "f1"):
            low, high = m.intervals[name]
            point = getattr(m, name)
            assert low <= point <= high, (m.finding, name, low, point, high)
            assert low < high
    low, high = result.mean_f1_ci
    assert low <= result.mean_f1 <= high


def test_bootstrap_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    truth, pred = _dataset()
    first = bootstrap_intervals(truth, pred, list(truth), resamples=300, seed=7)
    again = bootstrap_intervals(truth, pred, list(truth), resamples=300, seed=7)
    other = bootstrap_intervals(truth, pred, list(truth), resamples=300, seed=8)
    assert first == again
    assert first != other


def test_bootstrap_resamples_rows_with_replacement_and_takes_percentiles() -> None:
    """Recompute the F1 interval the slow way from the same draws of rows."""
    truth, pred = _dataset(rows=40)
    intervals, _ = bootstrap_intervals(truth, pred, ["edema"], resamples=50, seed=11)
    counts = np.random.default_rng(11).multinomial(40, np.full(40, 1 / 40), size=50)
    f1s = []
    for draw in counts:
        rows = np.repeat(np.arange(40), draw)
        f1 = confusion(
            [truth["edema"][i] for i in rows], [pred["edema"][i] for i in rows], "edema"
        ).f1
        if f1 is not None:
            f1s.append(f1)
    expected = tuple(np.percentile(f1s, [2.5, 97.5]))
    assert intervals["edema"]["f1"] == pytest.approx(expected)


def test_bootstrap_interval_narrows_with_more_rows_and_is_exact_for_a_perfect_model() -> None:
    truth, pred = _dataset(rows=60)
    small = evaluate(truth, pred, resamples=500, seed=0).by_name()["edema"].intervals["f1"]
    big = (
        evaluate(
            {k: v * 10 for k, v in truth.items()},
            {k: v * 10 for k, v in pred.items()},
            resamples=500,
            seed=0,
        )
        .by_name()["edema"]
        .intervals["f1"]
    )
    assert big[1] - big[0] < small[1] - small[0]
    perfect = evaluate({"edema": truth["edema"]}, {"edema": truth["edema"]}, resamples=200, seed=0)
    assert perfect.findings[0].intervals["f1"] == (1.0, 1.0)


def test_mean_f1_averages_defined_pathologies_only() -> None:
    truth = {"edema": [1, 0, 1], "pneumothorax": [0, 0, 0], "no_finding": [1, None, None]}
    pred = {"edema": [1, 1, 0], "pneumothorax": [0, 0, 0], "no_finding": [1, None, None]}
    result = evaluate(truth, pred, resamples=0)
    by_name = result.by_name()
    assert by_name["edema"].f1 == pytest.approx(0.5)  # TP 1, FP 1, FN 1
    assert by_name["pneumothorax"].f1 is None  # no positive on either side
    assert by_name["no_finding"].f1 == 1.0  # scored, but not averaged
    assert result.mean_f1_findings == ("edema",)
    assert result.mean_f1 == pytest.approx(0.5)
    assert result.mean_f1_ci is None and by_name["edema"].intervals == {}


def test_findings_are_scored_in_contract_order() -> None:
    truth = {"pneumothorax": [1], "atelectasis": [0], "no_finding": [None]}
    result = evaluate(truth, truth, resamples=0)
    assert [m.finding for m in result.findings] == ["atelectasis", "pneumothorax", "no_finding"]


def test_table_has_a_line_per_finding_and_the_mean() -> None:
    truth, pred = _dataset()
    result = evaluate(truth, pred, resamples=100, seed=0)
    table = format_table(result).splitlines()
    assert table[0].split()[:3] == ["finding", "rows", "definite"]
    assert [line.split()[0] for line in table[1:3]] == ["edema", "pneumothorax"]
    edema = result.by_name()["edema"]
    assert f"{edema.f1:.3f}" in table[1]
    assert table[3].startswith("mean F1 over 2 findings") and f"{result.mean_f1:.3f}" in table[3]


def test_table_csv_accepts_chexpert_headers_and_names_bad_cells(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("Path,Pleural Effusion,No Finding\na.png,1.0,\nb.png,-1.0,1.0\n")
    table = read_table(good, need=["Path"])
    assert table.truth == {"pleural_effusion": [1, -1], "no_finding": [None, 1]}
    bad = tmp_path / "bad.csv"
    bad.write_text("image,edema\na.png,1\nb.png,maybe\n")
    with pytest.raises(ValueError, match=r"row 2, column 'edema'.*'maybe'"):
        read_table(bad)
    none = tmp_path / "none.csv"
    none.write_text("image,comment\na.png,x\n")
    with pytest.raises(ValueError, match="no ground-truth column"):
        read_table(none)
    with pytest.raises(ValueError, match="missing column"):
        read_table(good, need=["image"])


def test_run_labels_each_report_and_scores_it(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("image,pleural_effusion,pneumothorax\na,1,0\nb,0,0\nc,1,1\n")
    reports = ["Small left effusion. No pneumothorax.", "No effusion.", "Possible effusion."]
    outcome = run(read_table(path), reports, resamples=0)
    assert outcome.predicted == {"pleural_effusion": [1, 0, -1], "pneumothorax": [0, None, None]}
    effusion = outcome.result.by_name()["pleural_effusion"].counts
    assert (effusion.tp, effusion.fp, effusion.fn, effusion.tn, effusion.definite) == (
        1,
        0,
        0,
        1,
        2,
    )
    document = outcome.to_dict()
    assert document["per_row"][2] == {
        "row": 3,
        "image": "c",
        "report": "Possible effusion.",
        "predicted": {"pleural_effusion": -1, "pneumothorax": None},
        "truth": {"pleural_effusion": 1, "pneumothorax": 1},
    }
    with pytest.raises(ValueError, match="one report per row"):
        run(read_table(path), reports[:2])
    assert set(FINDINGS) >= set(document["findings"])
    assert not math.isnan(document["findings"]["pleural_effusion"]["f1"])

"""Agreement metrics against confusion matrices worked out by hand (kappa included), the
paper's definite-pair policy, and the same numbers from per-study labels, from counted state
pairs (what the Prometheus collector reads) and in the summary's rows."""

from __future__ import annotations

import math

import pytest

from cxrnode.monitor.agreement import agreement_rows, confusion_from_counts
from model.evaluate import Confusion, bootstrap_intervals, cohen_kappa, confusion


def labels(*cells: tuple[int | None, int | None, int]) -> tuple[list, list]:
    """(truth, predicted) lists from (truth, predicted, how many) cells."""
    truth, predicted = [], []
    for t, p, n in cells:
        truth += [t] * n
        predicted += [p] * n
    return truth, predicted


# Each case: TP, FP, FN, TN and the values worked out by hand.
HAND = [
    # n=50: p_o = 35/50 = 0.7; predicted yes 25/50, truth yes 30/50;
    # p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7-0.5)/(1-0.5) = 0.4
    pytest.param(20, 5, 10, 15, 20 / 30, 20 / 25, 15 / 20, 40 / 55, 0.4, id="kappa 0.4"),
    # n=100: p_o = 0.6; predicted yes 0.6, truth yes 0.7; p_e = 0.42 + 0.12 = 0.54;
    # kappa = 0.06 / 0.46
    pytest.param(45, 15, 25, 15, 45 / 70, 45 / 60, 15 / 30, 90 / 130, 0.06 / 0.46, id="kappa 0.13"),
    # complete disagreement: p_o = 0, p_e = 0.5, kappa = -1
    pytest.param(0, 10, 10, 0, 0.0, 0.0, 0.0, 0.0, -1.0, id="kappa -1"),
    # perfect agreement with both classes: kappa 1
    pytest.param(7, 0, 0, 3, 1.0, 1.0, 1.0, 1.0, 1.0, id="kappa 1"),
    # every pair positive on both sides: p_e = 1, kappa undefined; no negatives, no specificity
    pytest.param(12, 0, 0, 0, 1.0, 1.0, None, 1.0, None, id="one class only"),
]


@pytest.mark.parametrize(("tp", "fp", "fn", "tn", "sens", "ppv", "spec", "f1", "kappa"), HAND)
def test_metrics_match_hand_computed_confusion_matrices(
    tp: int, fp: int, fn: int, tn: int, sens, ppv, spec, f1, kappa
) -> None:  # noqa: ANN001
    counts = Confusion(tp, fp, fn, tn, tp + fp + fn + tn)
    for got, want in (
        (counts.recall, sens),
        (counts.precision, ppv),
        (counts.specificity, spec),
        (counts.f1, f1),
        (counts.kappa, kappa),
    ):
        if want is None:
            assert got is None
        else:
            assert got == pytest.approx(want)
    assert cohen_kappa(tp, fp, fn, tn) == counts.kappa


def test_kappa_of_no_pairs_is_undefined() -> None:
    assert cohen_kappa(0, 0, 0, 0) is None


def test_only_definite_pairs_count_and_no_finding_blank_is_absent() -> None:
    truth, predicted = labels(
        (1, 1, 20),
        (0, 1, 5),
        (1, 0, 10),
        (0, 0, 15),
        (-1, 1, 4),  # uncertain radiologist: left out
        (1, None, 6),  # draft silent: left out
        (None, 0, 3),
    )
    counts = confusion(truth, predicted, "edema")
    assert (counts.tp, counts.fp, counts.fn, counts.tn, counts.rows) == (20, 5, 10, 15, 63)
    assert counts.kappa == pytest.approx(0.4)

    truth, predicted = labels((1, 1, 4), (None, 1, 2), (1, None, 3), (None, None, 1))
    no_finding = confusion(truth, predicted, "no_finding")
    assert (no_finding.tp, no_finding.fp, no_finding.fn, no_finding.tn) == (4, 2, 3, 1)
    assert no_finding.kappa == pytest.approx((0.5 - (6 * 7 + 4 * 3) / 100) / (1 - 0.54))


def test_counted_state_pairs_give_the_same_matrix_as_per_study_labels() -> None:
    counts = {
        ("present", "present"): 20,
        ("present", "absent"): 5,
        ("absent", "present"): 10,
        ("absent", "absent"): 15,
        ("present", "uncertain"): 4,
        ("not_mentioned", "present"): 6,
    }
    matrix = confusion_from_counts(counts, "edema")
    assert (matrix.tp, matrix.fp, matrix.fn, matrix.tn, matrix.rows) == (20, 5, 10, 15, 60)
    nf = confusion_from_counts(
        {("present", "not_mentioned"): 2, ("not_mentioned", "not_mentioned"): 1}, "no_finding"
    )
    assert (nf.tp, nf.fp, nf.fn, nf.tn) == (0, 2, 0, 1)


def test_summary_rows_carry_the_hand_computed_values_and_intervals_around_them() -> None:
    truth, predicted = labels((1, 1, 20), (0, 1, 5), (1, 0, 10), (0, 0, 15))
    state = {1: "present", 0: "absent", -1: "uncertain", None: "not_mentioned"}
    studies = {
        index: {"edema": (state[p], state[t])}
        for index, (t, p) in enumerate(zip(truth, predicted, strict=True))
    }

    rows = agreement_rows({"sha256:" + "ab" * 32: ("/models/m", studies)}, "all", resamples=400)

    edema = next(row for row in rows if row["finding"] == "edema")
    assert edema["model"] == "abababababababab"
    assert (edema["studies"], edema["pairs"], edema["tp"], edema["fp"]) == (50, 50, 20, 5)
    assert edema["kappa"] == pytest.approx(0.4)
    assert edema["sensitivity"] == pytest.approx(2 / 3)
    assert edema["specificity"] == pytest.approx(0.75)
    for measure in ("sensitivity", "ppv", "specificity", "f1", "kappa"):
        low, high = edema[f"{measure}_ci"]
        assert low <= edema[measure] <= high
    atelectasis = next(row for row in rows if row["finding"] == "atelectasis")
    assert atelectasis["pairs"] == 0 and atelectasis["f1"] is None
    assert atelectasis["f1_ci"] is None


def test_asking_for_kappa_intervals_does_not_change_the_f1_interval_of_a_seed() -> None:
    truth, predicted = labels((1, 1, 9), (0, 1, 3), (1, 0, 4), (0, 0, 11))
    plain, _ = bootstrap_intervals(
        {"edema": truth}, {"edema": predicted}, ["edema"], resamples=200, seed=3
    )
    more, _ = bootstrap_intervals(
        {"edema": truth},
        {"edema": predicted},
        ["edema"],
        resamples=200,
        seed=3,
        measures=("f1", "kappa", "specificity"),
    )
    assert more["edema"]["f1"] == plain["edema"]["f1"]
    low, high = more["edema"]["kappa"]
    point = cohen_kappa(9, 3, 4, 11)
    assert point is not None and low <= point <= high and not math.isnan(low)
    with pytest.raises(ValueError, match="unknown measures"):
        bootstrap_intervals({"edema": truth}, {"edema": predicted}, ["edema"], measures=("auc",))

"""The finding labeler: the labelled sentence set, and one test per negation/uncertainty rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sentence_set import HERE, Case, read_cases

from model.labeler import (
    FINDINGS,
    PATHOLOGIES,
    aggregate,
    find_mentions,
    label_report,
    label_report_states,
    split_sentences,
)

CASES = read_cases(HERE / "sentences.tsv", FINDINGS)


def labels(text: str, *names: str) -> tuple[int | None, ...]:
    result = label_report(text)
    return tuple(result[name] for name in names)


# --------------------------------------------------------------------------------------------
# The labelled sentence set
# --------------------------------------------------------------------------------------------


def test_sentence_set_is_large_and_covers_every_label_value_for_every_pathology() -> None:
    assert len(CASES) >= 150
    for finding in PATHOLOGIES:
        values = {c.expected[finding] for c in CASES if finding in c.expected}
        assert {1, 0} <= values, f"{finding} lacks a positive or negative example"
    assert {1, None} <= {c.expected["no_finding"] for c in CASES if "no_finding" in c.expected}


@pytest.mark.parametrize("case", CASES, ids=[f"L{c.line}" for c in CASES])
def test_sentence_is_labelled_as_a_radiologist_reads_it(case: Case) -> None:
    got = label_report(case.text)
    wrong = {k: (v, got[k]) for k, v in case.expected.items() if got[k] != v}
    assert not wrong, f"{case.text!r}: finding -> (expected, got): {wrong}"


# --------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------


def test_label_report_returns_every_finding_in_contract_order() -> None:
    result = label_report("Mild cardiomegaly.")
    assert (
        tuple(result)
        == FINDINGS
        == (
            "atelectasis",
            "cardiomegaly",
            "consolidation",
            "edema",
            "pleural_effusion",
            "pneumothorax",
            "pneumonia",
            "lung_opacity",
            "no_finding",
        )
    )
    assert set(result.values()) <= {1, 0, -1, None}


def test_states_use_the_report_result_vocabulary() -> None:
    states = label_report_states("Possible pneumonia. No effusion. Mild cardiomegaly.")
    assert states["pneumonia"] == "uncertain"
    assert states["pleural_effusion"] == "absent"
    assert states["cardiomegaly"] == "present"
    assert states["edema"] == "not_mentioned"


def test_blank_report_is_not_mentioned_everywhere_not_a_normal_study() -> None:
    for text in ("", "   \n "):
        assert set(label_report(text).values()) == {None}


def test_label_report_rejects_non_text_with_a_clear_message() -> None:
    with pytest.raises(TypeError, match="str"):
        label_report(None)  # type: ignore[arg-type]


def test_labeler_imports_without_torch() -> None:
    code = "import sys, model.labeler; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------------------------------------------
# Negation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "No pleural effusion.",
        "There is no evidence of pleural effusion.",
        "Lungs are clear without pleural effusion.",
        "The chest is free of pleural effusion.",
        "Negative for pleural effusion.",
        "Absence of pleural effusion.",
        "Interval resolution of the pleural effusion.",
        "Resolved pleural effusion.",
    ],
)
def test_pre_negation_cues_make_the_following_mention_absent(text: str) -> None:
    assert labels(text, "pleural_effusion") == (0,)


@pytest.mark.parametrize(
    "text",
    [
        "Pleural effusion is not seen.",
        "Pleural effusion is not identified.",
        "The pleural effusion has resolved.",
        "Pleural effusions are absent.",
        "Pleural effusion is excluded.",
        "The pleural effusion is no longer visualized.",
        "The pleural effusion has cleared.",
        "Pleural effusion is unlikely.",
    ],
)
def test_post_negation_cues_make_the_preceding_mention_absent(text: str) -> None:
    assert labels(text, "pleural_effusion") == (0,)


def test_negation_covers_every_item_of_a_list() -> None:
    for text in (
        "No effusion, pneumothorax or consolidation.",
        "No effusion, consolidation, or pneumothorax is seen.",
        "Effusion, consolidation and pneumothorax are not seen.",
    ):
        assert labels(text, "pleural_effusion", "consolidation", "pneumothorax") == (0, 0, 0), text


@pytest.mark.parametrize("joint", ["but", "however", "although", ";", "whereas"])
def test_negation_scope_ends_at_a_contrasting_conjunction(joint: str) -> None:
    text = f"No pneumothorax {joint} there is a left effusion."
    assert labels(text, "pneumothorax", "pleural_effusion") == (0, 1)


def test_negation_scope_ends_where_a_new_clause_brings_its_own_verb() -> None:
    assert labels("No effusion and the heart is enlarged.", "pleural_effusion", "cardiomegaly") == (
        0,
        1,
    )
    assert labels("No pneumothorax, consolidation persists.", "pneumothorax", "consolidation") == (
        0,
        1,
    )


def test_negation_scope_ends_at_a_comma_before_a_positive_modifier_outside_an_or_list() -> None:
    assert labels("No pneumothorax, mild cardiomegaly.", "pneumothorax", "cardiomegaly") == (0, 1)
    # Inside an or-list the modifier is part of what is negated.
    text = "No consolidation, large effusion, or pneumothorax."
    assert labels(text, "consolidation", "pleural_effusion", "pneumothorax") == (0, 0, 0)


def test_negation_never_reaches_back_to_an_earlier_mention() -> None:
    assert labels("Left pleural effusion, no right effusion.", "pleural_effusion") == (1,)
    assert labels("Mild cardiomegaly, no effusion.", "cardiomegaly") == (1,)


def test_no_large_effusion_is_negative_alone_and_does_not_cancel_a_small_effusion() -> None:
    assert labels("No large pleural effusion.", "pleural_effusion") == (0,)
    assert labels("Small left effusion. No large effusion.", "pleural_effusion") == (1,)
    assert labels("Small left effusion; no large effusion.", "pleural_effusion") == (1,)


def test_change_statements_are_not_negations() -> None:
    for text in (
        "No change in the left pleural effusion.",
        "No significant interval change in the left pleural effusion.",
        "No increase in the left pleural effusion.",
        "Left pleural effusion, not significantly changed.",
    ):
        assert labels(text, "pleural_effusion") == (1,), text


def test_partial_resolution_keeps_a_finding_present() -> None:
    for text in (
        "Partially resolved left lower lobe pneumonia.",
        "The pneumonia has not resolved.",
        "Resolving pneumonia.",
        "Near complete resolution of the pneumonia.",
    ):
        assert labels(text, "pneumonia") == (1,), text


def test_improving_unchanged_and_decreased_findings_are_present() -> None:
    for text in ("Improving pulmonary edema.", "Unchanged pulmonary edema.", "Decreased edema."):
        assert labels(text, "edema") == (1,), text


def test_wrapped_lines_keep_the_negation_scope() -> None:
    text = "No pleural effusion or\npneumothorax."
    assert labels(text, "pleural_effusion", "pneumothorax") == (0, 0)


def test_separate_lines_are_separate_sentences() -> None:
    text = "No pneumothorax\nSmall left effusion"
    assert labels(text, "pneumothorax", "pleural_effusion") == (0, 1)


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Pneumonia cannot be excluded.",
        "Pneumonia is not excluded.",
        "Pneumonia cannot be ruled out.",
        "Cannot exclude pneumonia.",
        "Cannot rule out pneumonia.",
        "We cannot entirely exclude pneumonia.",
    ],
)
def test_double_negation_is_uncertain_not_negative(text: str) -> None:
    assert labels(text, "pneumonia") == (-1,)


@pytest.mark.parametrize(
    "text",
    [
        "May be pneumonia.",
        "Possible pneumonia.",
        "Possibly pneumonia.",
        "Findings suggestive of pneumonia.",
        "Opacity concerning for pneumonia.",
        "Question of pneumonia.",
        "Suspected pneumonia.",
        "Differential includes pneumonia.",
        "Evaluate for pneumonia.",
        "Rule out pneumonia.",
        "Pneumonia?",
    ],
)
def test_uncertainty_cues_before_a_mention(text: str) -> None:
    assert labels(text, "pneumonia") == (-1,)


@pytest.mark.parametrize(
    "text",
    [
        "Pneumonia is possible.",
        "Pneumonia is suspected in the right lower lobe.",
        "A small pleural effusion may be present.",
        "Pneumonia is questioned.",
    ],
)
def test_uncertainty_cues_after_a_mention(text: str) -> None:
    finding = "pleural_effusion" if "effusion" in text else "pneumonia"
    assert labels(text, finding) == (-1,)


def test_a_hedge_about_a_cause_leaves_the_described_finding_certain() -> None:
    text = "Enlarged cardiac silhouette may be due to pericardial effusion."
    assert labels(text, "cardiomegaly", "pleural_effusion") == (1, None)
    assert labels("Opacity may represent atelectasis.", "lung_opacity", "atelectasis") == (1, -1)
    assert labels("Opacity likely related to scarring.", "lung_opacity") == (1,)
    assert labels("Possible scarring. Left basilar opacity.", "lung_opacity") == (1,)


def test_hedged_alternatives_stay_uncertain() -> None:
    # The or-policy (see test_or_between_two_findings_marks_both_present) does not override a
    # hedge that covers the alternatives.
    for text in (
        "Opacity may represent atelectasis or pneumonia.",
        "Possible atelectasis versus pneumonia.",
        "Atelectasis or pneumonia cannot be excluded.",
    ):
        assert labels(text, "atelectasis", "pneumonia") == (-1, -1), text


def test_rather_than_makes_only_the_rejected_alternative_uncertain() -> None:
    assert labels("Atelectasis rather than pneumonia.", "atelectasis", "pneumonia") == (1, -1)


def test_with_or_without_makes_what_follows_uncertain() -> None:
    text = "Atelectasis with or without superimposed pneumonia."
    assert labels(text, "atelectasis", "pneumonia") == (1, -1)


def test_negation_wins_over_uncertainty_in_the_same_scope() -> None:
    assert labels("No findings to suggest pneumonia.", "pneumonia") == (0,)
    assert labels("No convincing evidence of possible pneumonia.", "pneumonia") == (0,)


def test_uncertainty_scope_ends_at_a_new_cue_after_a_comma() -> None:
    text = "Possible left lower lobe pneumonia, no effusion."
    assert labels(text, "pneumonia", "pleural_effusion") == (-1, 0)
    text = "No effusion, possible pneumonia."
    assert labels(text, "pleural_effusion", "pneumonia") == (0, -1)


def test_telegraphic_not_excluded_covers_only_its_own_phrase() -> None:
    text = "Bibasilar atelectasis, pneumonia not excluded."
    assert labels(text, "atelectasis", "pneumonia") == (1, -1)


# --------------------------------------------------------------------------------------------
# Vocabulary, sections, history
# --------------------------------------------------------------------------------------------


def test_heart_size_statements_map_to_cardiomegaly() -> None:
    cases = {
        "Heart size is normal.": 0,
        "Normal heart size.": 0,
        "The heart is not enlarged.": 0,
        "Normal cardiomediastinal silhouette.": 0,
        "The heart is enlarged.": 1,
        "Enlarged cardiac silhouette.": 1,
        "Cardiac enlargement.": 1,
        "Heart size is borderline.": 1,
        "Borderline cardiomegaly.": 1,
        "Top normal heart size.": -1,
        "Heart size is at the upper limits of normal.": -1,
        "Heart size is stable.": None,
        "Enlarged cardiomediastinal silhouette.": None,
        "Congestive heart failure.": None,
    }
    for text, expected in cases.items():
        assert labels(text, "cardiomegaly") == (expected,), text


def test_lung_opacity_comes_only_from_opacity_words() -> None:
    text = "Right lower lobe consolidation and pulmonary edema. Pneumonia."
    assert labels(text, "lung_opacity") == (None,)
    assert labels("Hazy right basilar infiltrate.", "lung_opacity") == (1,)


def test_clear_lungs_mention_nothing_but_mean_no_finding() -> None:
    result = label_report("The lungs are clear.")
    assert all(result[f] is None for f in PATHOLOGIES)
    assert result["no_finding"] == 1


def test_history_sections_are_dropped() -> None:
    text = "INDICATION: Fever, rule out pneumonia.\nFINDINGS: Mild cardiomegaly."
    assert labels(text, "pneumonia", "cardiomegaly") == (None, 1)
    one_line = "History: pneumonia. Comparison: none. Impression: No acute process."
    assert labels(one_line, "pneumonia", "no_finding") == (None, 1)


def test_history_of_a_finding_is_not_a_current_finding() -> None:
    assert labels("History of pneumonia. Lungs are clear.", "pneumonia") == (None,)
    text = "Right chest tube placed for pneumothorax. No residual pneumothorax."
    assert labels(text, "pneumothorax") == (0,)


def test_sentence_splitting_keeps_decimals_and_drops_list_numbers() -> None:
    assert split_sentences("1. A 1.5 cm nodule. 2. No effusion.") == [
        "A 1.5 cm nodule",
        "No effusion",
    ]


# --------------------------------------------------------------------------------------------
# Aggregation and "no finding"
# --------------------------------------------------------------------------------------------


def test_aggregation_positive_beats_uncertain_beats_negative() -> None:
    assert aggregate([0, -1, 1]) == 1
    assert aggregate([0, -1]) == -1
    assert aggregate([0, 0]) == 0
    assert aggregate([]) is None
    assert labels("No effusion. Possible effusion. Small effusion.", "pleural_effusion") == (1,)
    assert labels("No effusion. Possible small effusion.", "pleural_effusion") == (-1,)


def test_no_finding_is_one_only_without_positive_or_uncertain_pathology() -> None:
    assert labels("No effusion. Normal heart size.", "no_finding") == (1,)
    assert labels("Possible small effusion.", "no_finding") == (None,)
    assert labels("Mild atelectasis.", "no_finding") == (None,)
    # CheXpert's other observations count too, though they are not returned ...
    assert labels("Healing rib fracture.", "no_finding") == (None,)
    assert labels("Right upper lobe nodule.", "no_finding") == (None,)
    assert labels("No acute fracture. No nodule.", "no_finding") == (1,)
    # ... and so do support devices (see test_no_finding_means_nothing_abnormal_at_all).
    assert labels("Endotracheal tube in good position. Lungs clear.", "no_finding") == (None,)


def test_no_finding_is_never_zero() -> None:
    for case in CASES:
        assert label_report(case.text)["no_finding"] in (1, None)


def test_mentions_say_which_cue_decided_them() -> None:
    (mention,) = find_mentions("There is no pneumothorax.")
    assert (mention.finding, mention.label, mention.cues) == ("pneumothorax", 0, ("no",))


def test_a_full_report_with_sections_is_labelled_from_findings_and_impression() -> None:
    report = (
        "FINAL REPORT\n"
        "EXAMINATION:  CHEST (PA AND LAT)\n"
        "INDICATION:  Cough and fever, evaluate for pneumonia\n"
        "COMPARISON:  None.\n"
        "FINDINGS:\n"
        "PA and lateral views of the chest provided. There is no focal consolidation,\n"
        "effusion, or pneumothorax. The cardiomediastinal silhouette is normal.\n"
        "IMPRESSION:\n"
        "No acute intrathoracic process."
    )
    assert label_report(report) == {
        "atelectasis": None,
        "cardiomegaly": 0,
        "consolidation": 0,
        "edema": None,
        "pleural_effusion": 0,
        "pneumothorax": 0,
        "pneumonia": None,
        "lung_opacity": None,
        "no_finding": 1,
    }


def test_odd_text_never_raises() -> None:
    import random
    import string

    rng = random.Random(0)
    words = [
        "no",
        "not",
        "effusion",
        "heart",
        "size",
        "normal",
        "may",
        "be",
        ",",
        ";",
        "and",
        "or",
        "but",
        "cannot",
        "excluded",
        "?",
        "resolved",
    ]
    texts = ["...", "?", ";;", "No", ":", "(", "Heart:", "INDICATION:", "é ü", "1. 2.", "versus"]
    for _ in range(300):
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))))
        texts.append("".join(rng.choice(string.printable) for _ in range(rng.randint(1, 50))))
    for text in texts:
        result = label_report(text)
        assert set(result.values()) <= {1, 0, -1, None}, text

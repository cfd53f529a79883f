"""Policies that make the labeler agree with how readers code real radiology reports.

One test per class of error found by reading a labelled report collection (see
docs/labeler.md); every sentence here was written for this file.
"""

from __future__ import annotations

import pytest

from model.labeler import find_mentions, label_report


def labels(text: str, *names: str) -> tuple[int | None, ...]:
    result = label_report(text)
    return tuple(result[name] for name in names)


# --------------------------------------------------------------------------------------------
# "A or B", "A versus B", "A and/or B": both present
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Right basal atelectasis or pneumonia.",
        "Left lower lobe atelectasis versus pneumonia.",
        "Atelectasis vs. pneumonia at the left base.",
        "Atelectasis and/or pneumonia in the lingula.",
        "Patchy atelectasis/pneumonia in both bases.",
        "Streaky opacity, pneumonia or atelectasis.",
    ],
)
def test_or_between_two_findings_marks_both_present(text: str) -> None:
    assert labels(text, "atelectasis", "pneumonia") == (1, 1)


def test_or_with_a_non_finding_keeps_the_finding_present() -> None:
    assert labels("Minimal scarring or atelectasis at the right apex.", "atelectasis") == (1,)
    assert labels("Small effusion versus pleural thickening on the left.", "pleural_effusion") == (
        1,
    )


def test_or_inside_a_negation_or_a_hedge_is_not_present() -> None:
    assert labels("No atelectasis or pneumonia.", "atelectasis", "pneumonia") == (0, 0)
    text = "Basilar opacity could be atelectasis or pneumonia."
    assert labels(text, "atelectasis", "pneumonia") == (-1, -1)
    text = "Bibasilar atelectasis with or without superimposed pneumonia."
    assert labels(text, "atelectasis", "pneumonia") == (1, -1)


def test_rather_than_still_makes_the_rejected_alternative_uncertain() -> None:
    text = "Linear atelectasis rather than pneumonia."
    assert labels(text, "atelectasis", "pneumonia") == (1, -1)


# --------------------------------------------------------------------------------------------
# Edema means pulmonary edema
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Mild central vascular congestion.",
        "Engorged pulmonary vessels.",
        "Pulmonary vascular engorgement is noted.",
        "Cephalization of the pulmonary vasculature.",
        "Appearance suggests fluid overload.",
        "Changes of congestive heart failure.",
    ],
)
def test_vascular_congestion_and_heart_failure_are_not_edema(text: str) -> None:
    result = label_report(text)
    assert result["edema"] is None
    assert result["no_finding"] is None  # still not a normal study


def test_the_word_edema_is_edema_and_other_edema_is_not() -> None:
    assert labels("Mild interstitial pulmonary edema.", "edema") == (1,)
    assert labels("Congestion with early alveolar edema.", "edema") == (1,)
    assert labels("Soft tissue edema of the chest wall.", "edema") == (None,)
    assert labels("Vascular congestion without frank edema.", "edema") == (0,)


# --------------------------------------------------------------------------------------------
# "within (normal) limits"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Heart size and pulmonary vascular markings are within normal limits.",
        "The pulmonary vascular engorgement appears within limits of normal.",
        "Hilar contours are within normal limits.",
        "Heart size within the limits of normal.",
    ],
)
def test_within_normal_limits_negates_what_precedes_it(text: str) -> None:
    result = label_report(text)
    assert result["no_finding"] == 1
    assert result["cardiomegaly"] in (0, None)


def test_within_normal_limits_does_not_reach_back_over_a_list() -> None:
    text = "Mild cardiomegaly and pulmonary vascularity within normal limits."
    assert labels(text, "cardiomegaly") == (1,)
    text = "Small right effusion and hilar contours within normal limits."
    assert labels(text, "pleural_effusion") == (1,)


# --------------------------------------------------------------------------------------------
# Requests and questions are not findings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Please correlate clinically for pneumonia.",
        "Clinical correlation for pneumonia is advised.",
        "Correlation is recommended to exclude pneumonia.",
        "Repeat radiograph to rule out pneumonia.",
        "Pneumonia is to be ruled out.",
        "In the proper clinical setting, this could be early pneumonia.",
        "In the appropriate clinical context the opacity is compatible with pneumonia.",
    ],
)
def test_requests_to_correlate_or_rule_out_are_uncertain(text: str) -> None:
    assert labels(text, "pneumonia") == (-1,)


# --------------------------------------------------------------------------------------------
# History and healed disease
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Calcified nodes from prior granulomatous infection.",
        "Residua of old granulomatous disease.",
        "Apical scarring, sequela of remote tuberculous infection.",
        "Linear scar from a previous pneumonia.",
    ],
)
def test_healed_granulomatous_infection_is_not_pneumonia(text: str) -> None:
    result = label_report(text)
    assert result["pneumonia"] is None
    assert result["no_finding"] is None  # a granuloma or scar is still a finding


def test_infection_alone_is_not_pneumonia() -> None:
    assert labels("Airspace opacity compatible with infection.", "pneumonia") == (None,)
    assert labels("Airspace opacity compatible with pneumonia.", "pneumonia") == (1,)
    assert labels("Findings compatible with infection.", "no_finding") == (None,)


# --------------------------------------------------------------------------------------------
# Synonyms
# --------------------------------------------------------------------------------------------


def test_pneumonitis_is_pneumonia() -> None:
    assert labels("Patchy right lower lobe pneumonitis.", "pneumonia") == (1,)
    assert labels("No evidence of pneumonitis.", "pneumonia") == (0,)


@pytest.mark.parametrize(
    "text",
    [
        "Small left apical pleural air collection.",
        "There is air in the right pleural space.",
        "Moderate right hydropneumothorax.",
        "Small left hemopneumothorax.",
    ],
)
def test_pleural_air_and_mixed_pneumothoraces_are_pneumothorax(text: str) -> None:
    assert labels(text, "pneumothorax") == (1,)


def test_hydropneumothorax_is_also_an_effusion_and_pleural_air_can_be_negated() -> None:
    assert labels("Moderate right hydropneumothorax.", "pleural_effusion") == (1,)
    assert labels("No pleural air collection.", "pneumothorax") == (0,)


# --------------------------------------------------------------------------------------------
# Hedges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Probable right middle lobe pneumonia.",
        "Likely left basilar pneumonia.",
        "Pneumonia is likely.",
        "Opacity most likely representing pneumonia.",
        "Opacity, probably pneumonia.",
        "Appearance most suggestive of pneumonia.",
        "Findings are most consistent with pneumonia.",
        "Right basal opacity, favored to represent pneumonia.",
        "Presumed pneumonia in the left lower lobe.",
    ],
)
def test_confident_hedges_mark_a_finding_present(text: str) -> None:
    assert labels(text, "pneumonia") == (1,)


@pytest.mark.parametrize(
    "text",
    [
        "Possible pneumonia.",
        "Opacity may represent pneumonia.",
        "Findings suggestive of pneumonia.",
        "Opacity suspicious for pneumonia.",
        "Pneumonia is less likely.",
        "Early pneumonia cannot be excluded.",
    ],
)
def test_weak_hedges_stay_uncertain(text: str) -> None:
    assert labels(text, "pneumonia") == (-1,)


def test_unlikely_stays_negative() -> None:
    assert labels("Pneumonia is unlikely.", "pneumonia") == (0,)
    assert labels("Pneumonia is not likely.", "pneumonia") == (0,)


# --------------------------------------------------------------------------------------------
# Heart size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Borderline cardiomegaly.",
        "Borderline heart size.",
        "The heart is borderline enlarged.",
        "Cardiac silhouette is borderline in size.",
        "Borderline enlargement of the cardiac silhouette.",
        "Heart size at the upper limit of normal or mildly enlarged.",
    ],
)
def test_borderline_heart_size_is_cardiomegaly(text: str) -> None:
    assert labels(text, "cardiomegaly", "no_finding") == (1, None)


def test_upper_limits_of_normal_is_uncertain_but_still_a_normal_study() -> None:
    for text in ("Heart size is at the upper limits of normal.", "The heart is top normal."):
        assert labels(text, "cardiomegaly", "no_finding") == (-1, 1), text


# --------------------------------------------------------------------------------------------
# "No finding" means a normal study
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Lungs are clear. Calcified granuloma in the left upper lobe.",
        "Lungs are clear. Degenerative changes of the thoracic spine.",
        "Lungs are clear. Mild thoracic scoliosis.",
        "Hyperinflated lungs without focal opacity.",
        "Low lung volumes. No consolidation.",
        "Tortuous thoracic aorta. Lungs are clear.",
        "Atherosclerotic calcification of the aortic arch.",
        "Small hiatal hernia. No effusion.",
        "Elevation of the right hemidiaphragm.",
        "Prominent interstitial markings.",
        "Blunting of the right costophrenic angle.",
        "Left chest wall pacemaker. Lungs are clear.",
        "Median sternotomy wires. No acute process.",
        "Right internal jugular catheter with tip at the cavoatrial junction.",
        "Surgical clips in the right upper quadrant.",
        "Lines and tubes are unchanged in position.",
    ],
)
def test_no_finding_means_nothing_abnormal_at_all(text: str) -> None:
    assert labels(text, "no_finding") == (None,)


@pytest.mark.parametrize(
    "text",
    [
        "Heart size is normal. Lungs are clear. No effusion or pneumothorax.",
        "No acute osseous abnormality. No acute cardiopulmonary process.",
        "No degenerative changes. No granulomas.",
        "The chest tube has been removed. No pneumothorax.",
        "Normal mediastinal contours. Lungs are well expanded and clear.",
    ],
)
def test_a_normal_study_is_no_finding(text: str) -> None:
    assert labels(text, "no_finding") == (1,)


# --------------------------------------------------------------------------------------------
# Opacity
# --------------------------------------------------------------------------------------------


def test_interstitial_markings_are_not_a_lung_opacity() -> None:
    assert labels("Coarse interstitial markings at both bases.", "lung_opacity") == (None,)
    assert labels("Bilateral interstitial opacities.", "lung_opacity") == (1,)


def test_a_density_over_a_rib_or_nipple_is_not_a_lung_opacity() -> None:
    assert labels("Small nodular density projecting over the right sixth rib.", "lung_opacity") == (
        None,
    )
    assert labels("Round opacity overlying the left nipple.", "lung_opacity") == (None,)
    assert labels("Patchy opacity in the right lower lobe.", "lung_opacity") == (1,)


def test_blunting_alone_is_not_an_effusion() -> None:
    assert labels("Blunting of the left costophrenic angle.", "pleural_effusion") == (None,)
    assert labels("Blunted left costophrenic angle from a small effusion.", "pleural_effusion") == (
        1,
    )


# --------------------------------------------------------------------------------------------
# Lists
# --------------------------------------------------------------------------------------------


def test_a_suspicious_item_inside_a_negated_list_is_negated() -> None:
    text = "No consolidation, suspicious opacity, pleural effusion, or pneumothorax."
    assert labels(text, "consolidation", "lung_opacity", "pleural_effusion", "pneumothorax") == (
        0,
        0,
        0,
        0,
    )
    # Outside an or-list, a hedge after a comma still starts its own statement.
    text = "No effusion, suspicious opacity in the right apex."
    assert labels(text, "pleural_effusion", "lung_opacity") == (0, -1)


def test_a_differential_list_covers_every_item() -> None:
    text = "Differential considerations include infection, aspiration and mild pulmonary edema."
    assert labels(text, "edema") == (-1,)
    text = "Opacities which may be compatible with mild pulmonary edema."
    assert labels(text, "edema") == (-1,)


def test_mentions_show_the_alternative_that_made_a_finding_present() -> None:
    mentions = [m for m in find_mentions("Atelectasis or pneumonia.") if m.finding == "pneumonia"]
    assert [(m.label, m.cues) for m in mentions] == [(1, ("or/versus",))]

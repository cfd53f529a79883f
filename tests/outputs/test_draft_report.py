"""The draft the builders take is the model's result (one type): checked at construction,
round-tripped through its dict form, and read the way the builders read it."""

from __future__ import annotations

import json

import pytest

from cxrnode.outputs.build import PIPELINE_VERSION
from model.contracts import FINDING_STATES, FINDINGS, ModelResult, split_impression
from model.labeler import FINDINGS as LABELER_FINDINGS

RESULT = {
    "report": "Findings: Heart is enlarged.\nImpression: Cardiomegaly.",
    "differential": "Heart failure.",
    "recommendation": "Echocardiography.",
    "findings": {name: "not_mentioned" for name in FINDINGS} | {"cardiomegaly": "present"},
    "finding_sources": {"cardiomegaly": "report"},
    "prompts": {"report": "paediatric"},
    "model_id": "ECOFRI/CXR-LLAVA-v2",
    "model_hash": "c0" * 32,
    "timings": {"total": 1.5},
}


def test_there_is_one_draft_type() -> None:
    assert ModelResult is ModelResult
    assert FINDING_STATES == ("present", "absent", "uncertain", "not_mentioned")


def test_the_result_for_a_pipeline_has_what_the_outputs_need() -> None:
    draft = ModelResult.from_dict(RESULT).for_pipeline("0.1.0")

    assert draft.report == RESULT["report"]
    assert draft.findings["cardiomegaly"] == "present"
    assert (draft.model_id, draft.model_hash) == ("ECOFRI/CXR-LLAVA-v2", "c0" * 32)
    assert draft.pipeline_version == "0.1.0"
    assert draft.paediatric_prompt
    assert draft.model_name == "CXR-LLAVA-v2"
    assert ModelResult.from_dict(RESULT).pipeline_version is None, "the model side sets none"


def test_to_dict_is_json_and_round_trips() -> None:
    draft = ModelResult.from_dict(RESULT).for_pipeline(PIPELINE_VERSION)

    assert ModelResult.from_dict(json.loads(json.dumps(draft.to_dict()))) == draft


def test_findings_not_given_are_not_mentioned_and_ordered_as_the_labeler() -> None:
    draft = ModelResult.from_dict({**RESULT, "findings": {"pneumothorax": "absent"}})

    assert tuple(draft.findings) == FINDINGS
    assert draft.findings["pneumothorax"] == "absent"
    assert draft.findings["edema"] == "not_mentioned"


def test_unknown_finding_or_state_is_refused_naming_the_type_and_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="ModelResult.findings has unknown names \\['fracture'\\]"):
        ModelResult.from_dict({**RESULT, "findings": {"fracture": "present"}})
    with pytest.raises(ValueError, match="ModelResult.findings has invalid states .*expected"):
        ModelResult.from_dict({**RESULT, "findings": {"edema": "1"}})


def test_missing_provenance_is_refused() -> None:
    with pytest.raises(ValueError, match="ModelResult lacks \\['model_hash'\\]"):
        ModelResult.from_dict({k: v for k, v in RESULT.items() if k != "model_hash"})
    with pytest.raises(ValueError, match="ModelResult.model_hash must be a non-empty string"):
        ModelResult.from_dict({**RESULT, "model_hash": ""})
    with pytest.raises(ValueError, match="ModelResult.pipeline_version"):
        ModelResult.from_dict(RESULT).for_pipeline("")


def test_empty_answers_make_an_empty_draft() -> None:
    draft = ModelResult.from_dict({**RESULT, "report": "", "recommendation": " "})
    draft = ModelResult(**{**draft.__dict__, "differential": ""})

    assert draft.is_empty
    assert draft.sections == ("", "")
    assert not ModelResult.from_dict(RESULT).is_empty


def test_draft_is_immutable() -> None:
    draft = ModelResult.from_dict(RESULT)

    with pytest.raises(AttributeError):
        draft.report = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("Findings: A. Impression: B.", ("A.", "B.")),
        ("FINDINGS:\nA.\n\nIMPRESSION:\nB.", ("A.", "B.")),
        ("The lungs are clear. Conclusion: normal.", ("The lungs are clear.", "normal.")),
        ("No impression heading here, only an impression of haze.", None),
        ("Impression: only this.", ("", "only this.")),
    ],
)
def test_impression_is_split_only_where_the_report_labels_it(
    report: str, expected: tuple[str, str] | None
) -> None:
    assert split_impression(report) == (expected or (report, ""))


def test_findings_names_match_the_labeler() -> None:
    assert FINDINGS == LABELER_FINDINGS

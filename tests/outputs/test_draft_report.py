"""DraftReport: validated at construction, built from ReportResult.to_dict()."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cxrnode.outputs.draft import FINDINGS, DraftReport, split_impression

RESULT = {
    "report": "Findings: Heart is enlarged.\nImpression: Cardiomegaly.",
    "differential": "Heart failure.",
    "recommendation": "Echocardiography.",
    "findings": {name: "not_mentioned" for name in FINDINGS} | {"cardiomegaly": "present"},
    "finding_sources": {"cardiomegaly": "report"},
    "prompts": {"report": "paediatric"},
    "model": {"id": "ECOFRI/CXR-LLAVA-v2", "hash": "c0" * 32},
    "timings": {"total": 1.5},
}


def test_from_result_takes_what_the_outputs_need() -> None:
    draft = DraftReport.from_result(RESULT, pipeline_version="0.1.0")

    assert draft.report == RESULT["report"]
    assert draft.findings["cardiomegaly"] == "present"
    assert (draft.model_id, draft.model_hash) == ("ECOFRI/CXR-LLAVA-v2", "c0" * 32)
    assert draft.pipeline_version == "0.1.0"
    assert draft.paediatric_prompt
    assert draft.model_name == "CXR-LLAVA-v2"


def test_to_dict_is_json_and_round_trips() -> None:
    draft = DraftReport.from_result(RESULT, pipeline_version="0.1.0")

    assert DraftReport(**json.loads(json.dumps(draft.to_dict()))) == draft


def test_findings_not_given_are_not_mentioned_and_ordered_as_the_labeler() -> None:
    draft = DraftReport.from_result(
        {**RESULT, "findings": {"pneumothorax": "absent"}}, pipeline_version="1"
    )

    assert tuple(draft.findings) == FINDINGS
    assert draft.findings["pneumothorax"] == "absent"
    assert draft.findings["edema"] == "not_mentioned"


def test_unknown_finding_or_state_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="unknown finding names \\['fracture'\\]"):
        DraftReport.from_result({**RESULT, "findings": {"fracture": "present"}}, "1")
    with pytest.raises(ValueError, match="invalid states .*expected one of"):
        DraftReport.from_result({**RESULT, "findings": {"edema": "1"}}, "1")


def test_missing_provenance_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks \\['model'\\]"):
        DraftReport.from_result({k: v for k, v in RESULT.items() if k != "model"}, "1")
    with pytest.raises(ValueError, match="model_hash must be a non-empty string"):
        DraftReport.from_result({**RESULT, "model": {"id": "x", "hash": ""}}, "1")
    with pytest.raises(ValueError, match="pipeline_version"):
        DraftReport.from_result(RESULT, "")


def test_empty_answers_make_an_empty_draft() -> None:
    draft = DraftReport.from_result(
        {**RESULT, "report": "", "differential": None, "recommendation": " "}, "1"
    )

    assert draft.is_empty
    assert draft.sections == ("", "")
    assert not DraftReport.from_result(RESULT, "1").is_empty


def test_draft_is_immutable() -> None:
    draft = DraftReport.from_result(RESULT, "1")

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
    if importlib.util.find_spec("model.labeler") is None:
        pytest.fail(
            "model/labeler.py is missing: cxrnode.outputs.draft.FINDINGS must equal its FINDINGS"
        )
    from model.labeler import FINDINGS as LABELER_FINDINGS

    assert FINDINGS == LABELER_FINDINGS

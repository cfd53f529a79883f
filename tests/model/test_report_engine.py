"""ReportEngine: the three-turn conversation, findings, prompt variants and confirmations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.labeler import FINDINGS, label_report, to_states
from model.pipeline import ReportEngine, StudyContext
from model.preprocess import UnsupportedImageError
from model.prompts import PromptConfig


def test_a_result_carries_answers_findings_prompts_model_and_timings(engine, images) -> None:
    (result,) = engine.generate(images[:1], temperature=0, max_new_tokens=6)
    d = result.to_dict()
    assert set(d) == {
        "report",
        "differential",
        "recommendation",
        "findings",
        "finding_sources",
        "prompts",
        "model_id",
        "model_hash",
        "timings",
        "batch_id",
        "batch_size",
        "worker",
        "pipeline_version",  # set by the node when it builds the outputs
    }
    assert d["pipeline_version"] is None
    assert all(isinstance(d[k], str) and d[k] == d[k].strip() for k in ("report", "differential"))
    assert list(d["findings"]) == list(FINDINGS)
    assert set(d["finding_sources"].values()) == {"report"}
    assert (d["model_id"], d["model_hash"]) == (engine.model_id, engine.model_hash)
    timings = d["timings"]
    assert set(timings) == {"queued", "encode", "prefill", "decode", "first_token", "total"}
    assert 0 <= timings["queued"] <= timings["first_token"] <= timings["total"]
    assert d["prompts"]["report"] == "default" and d["prompts"]["confirmation"] == "off"


def test_findings_are_the_labels_of_the_report_text(engine, images) -> None:
    results = engine.generate(images[:3], temperature=0, max_new_tokens=8)
    for r in results:
        assert r.findings == to_states(label_report(r.report))


def test_children_get_the_paediatric_report_prompt_and_it_is_recorded(engine, images) -> None:
    contexts = [StudyContext(age_years=4), StudyContext(age_years=17.9), StudyContext(age_years=18)]
    results = engine.generate(images[:3], contexts, temperature=0, max_new_tokens=4)
    assert [r.prompts["report"] for r in results] == ["paediatric", "paediatric", "default"]
    alone = engine.generate(
        images[:1], [StudyContext(age_years=40)], temperature=0, max_new_tokens=4
    )
    assert alone[0].report != results[0].report  # the caution changes what the model reads


def test_report_only_skips_the_follow_up_turns_and_keeps_the_report(engine, images) -> None:
    full = engine.generate(images[:2], temperature=0, max_new_tokens=6)
    short = engine.generate(images[:2], temperature=0, max_new_tokens=6, report_only=True)
    assert [r.report for r in short] == [r.report for r in full]
    assert all(r.differential == r.recommendation == "" for r in short)
    assert short[0].prompts["differential"] == short[0].prompts["recommendation"] == "skipped"


def test_non_grayscale_images_are_refused(engine) -> None:
    with pytest.raises(UnsupportedImageError, match="grayscale"):
        engine.generate([np.zeros((600, 600, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 images but 1 contexts"):
        engine.generate([np.zeros((600, 600), np.uint8)] * 2, [None])


@pytest.fixture
def yes_engine(tiny_dir) -> ReportEngine:
    """The tiny model with a head that always says "Yes" (so confirmations answer yes)."""
    engine = ReportEngine.load(tiny_dir, device="cpu")
    yes = engine.tokenizer.sp.piece_to_id("\u2581Yes")
    assert engine.tokenizer.id_to_token(yes) == "\u2581Yes"
    hidden, vocab = engine.model.lm_head.in_features, engine.model.lm_head.out_features
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[yes] = 1.0
    engine.model.lm_head = head
    return engine


def test_confirmation_turns_answer_for_unmentioned_findings(yes_engine, images) -> None:
    plain = yes_engine.generate(images[:2], temperature=0, max_new_tokens=4)
    yes_engine.prompts = PromptConfig(confirm_findings=True)
    confirmed = yes_engine.generate(images[:2], temperature=0, max_new_tokens=4)
    for before, after in zip(plain, confirmed, strict=True):
        assert before.report.startswith("Yes")  # says nothing about any finding
        assert before.findings["cardiomegaly"] == "not_mentioned"
        # The three main answers do not change: confirmations come after them.
        assert (after.report, after.differential, after.recommendation) == (
            before.report,
            before.differential,
            before.recommendation,
        )
        assert after.prompts["confirmation"] == "on"
        for name in FINDINGS[:-1]:
            assert after.findings[name] == "present"
            assert after.finding_sources[name] == "confirmation"
        assert after.findings["no_finding"] != "present"

"""Self-consistency: k samples of a study in one batch, sharing its image and prompt, voted."""

from __future__ import annotations

import pytest

from model.consensus import vote
from model.contracts import FINDINGS, GenerationParams, ModelResult
from model.serving import ReportServer


def _result(report: str, **findings: str) -> ModelResult:
    return ModelResult(
        report=report,
        differential="",
        recommendation="",
        findings=findings,
        model_id="tiny",
        model_hash="h" * 8,
    )


def test_the_vote_takes_the_majority_and_the_report_of_the_sample_that_agrees_most() -> None:
    samples = [
        _result("a", pneumothorax="present", cardiomegaly="absent"),
        _result("b", pneumothorax="present", cardiomegaly="present"),
        _result("c", pneumothorax="absent", cardiomegaly="present"),
        _result("d", pneumothorax="present", cardiomegaly="present"),
        _result("e", pneumothorax="present"),
    ]
    voted = vote(samples)
    assert voted.findings["pneumothorax"] == "present"
    assert voted.findings["cardiomegaly"] == "present"
    assert voted.votes["pneumothorax"] == {"present": 4, "absent": 1}
    assert voted.samples == 5
    assert voted.report == "b"  # agrees on both; "d" does too but comes later
    assert set(voted.votes) == set(FINDINGS)


def test_a_tie_or_too_little_agreement_is_undetermined() -> None:
    tie = vote([_result("a", edema="present"), _result("b", edema="absent")])
    assert tie.findings["edema"] == "uncertain"
    three_of_five = [_result(str(i), edema="present" if i < 3 else "absent") for i in range(5)]
    assert vote(three_of_five).findings["edema"] == "present"
    assert vote(three_of_five, min_agreement=0.8).findings["edema"] == "uncertain"


def test_one_sample_is_returned_unchanged() -> None:
    only = _result("a", edema="present")
    assert vote([only]) is only


def test_k_samples_share_one_image_encoding_and_one_prompt_prefill(engine, images) -> None:
    alone = engine.scheduler(1)
    alone.add(engine.conversation(images[0], None, _params(), seed=11))
    alone.run()
    five = engine.samples(images[0], None, _params(), 5, seed=11)
    together = engine.scheduler(5)
    for conv in five:
        together.add(conv)
    together.run()
    assert together.stats.images == 1  # one encoding for the five samples
    # Without sharing, five samples would feed five times what one study feeds; with it, the
    # first turn (image and prompt: most of it) is fed once and only follow-ups are per row.
    assert together.stats.prefill_tokens < 2 * alone.stats.prefill_tokens
    voted = vote([conv.result() for conv in five])
    assert voted.samples == 5
    assert all(sum(counts.values()) == 5 for counts in voted.votes.values())


def test_each_sample_draws_as_it_would_alone(engine, images) -> None:
    """Sharing the prefix changes nothing a sample draws: sample j of a group equals the
    study run alone with the sample's seed."""
    group = engine.samples(images[0], None, _params(), 3, seed=100)
    scheduler = engine.scheduler(3)
    for conv in group:
        scheduler.add(conv)
    scheduler.run()
    together = [conv.result().report for conv in group]
    alone = [
        engine.generate(images[:1], temperature=0.9, seed=100 + j, max_new_tokens=8)[0].report
        for j in range(3)
    ]
    assert together == alone
    assert len(set(together)) > 1  # the samples really differ


def test_the_server_resolves_a_study_to_the_vote_of_its_samples(engine, images) -> None:
    with ReportServer(engine, max_batch=6) as server:
        params = GenerationParams(temperature=0.9, max_new_tokens=8, samples=4)
        result = server.submit(images[0], None, params, seed=5).result(timeout=300)
        single = server.submit(images[1], None, GenerationParams(max_new_tokens=8)).result(300)
    assert result.samples == 4
    assert all(sum(c.values()) == 4 for c in result.votes.values())
    assert single.samples == 1 and single.votes == {}


def _params():
    from model.generate import SamplingParams

    return SamplingParams(temperature=0.9, max_new_tokens=8)


@pytest.mark.parametrize("bad", [0, 17])
def test_samples_out_of_range_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="samples"):
        GenerationParams(samples=bad)

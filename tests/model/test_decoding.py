"""Decoding: reference sampling rules, batching invariance, and KV-cache reuse across turns."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.chat import IMAGE_TOKEN_INDEX, Message, render_llama2, tokenize_with_image
from model.generate import ChatBatch, SamplingParams, generate_turn, warp_logits
from model.loader import inspect_checkpoint, load_model
from model.pipeline import StudyContext
from model.prompts import SYSTEM, PromptConfig

AGES = [40, 5, None, 12, 70, 30, 2, 55]  # children get a longer prompt: left padding in turn 1


def prompt_ids(engine, age=None, answer=None, question=None) -> list[int]:
    first, _ = PromptConfig().report_message(age)
    chat = [Message("system", SYSTEM), Message("user", first)]
    if answer is not None:
        chat += [Message("assistant", answer), Message("user", question)]
    return tokenize_with_image(render_llama2(chat), engine.tokenizer)


@pytest.fixture
def eos_model(tiny_dir):
    """The tiny model with a head that always prefers EOS (id 2)."""
    model = load_model(inspect_checkpoint(tiny_dir), device="cpu")
    hidden, vocab = model.lm_head.in_features, model.lm_head.out_features
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[2] = 1.0
    model.lm_head = head
    return model


def test_warpers_apply_temperature_then_top_k_then_top_p_like_transformers() -> None:
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.2, top_p=0.8, top_k=5)
    reference = LogitsProcessorList(
        [TemperatureLogitsWarper(0.2), TopKLogitsWarper(5), TopPLogitsWarper(0.8)]
    )
    expected = reference(None, logits.clone())
    got = warp_logits(logits, params)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


@pytest.mark.parametrize("temperature", [0.0, 0.001])
def test_temperature_up_to_0_001_is_greedy(temperature) -> None:
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=0.0011).greedy


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_new_tokens": 513}, "cap on one answer"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_sampling_options_out_of_range_are_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_a_studys_greedy_output_is_the_same_alone_and_in_a_batch_of_8(engine, images) -> None:
    contexts = [StudyContext(age_years=a) for a in AGES]
    batched = engine.generate(images, contexts, temperature=0, max_new_tokens=10)
    assert len({r.report for r in batched}) > 1, "the images should lead to different reports"
    assert {r.prompts["report"] for r in batched} == {"default", "paediatric"}  # padded rows
    for image, context, together in zip(images, contexts, batched, strict=True):
        (alone,) = engine.generate([image], [context], temperature=0, max_new_tokens=10)
        assert (alone.report, alone.differential, alone.recommendation) == (
            together.report,
            together.differential,
            together.recommendation,
        )
        assert alone.prompts == together.prompts


def test_rows_that_stop_early_leave_masked_holes_that_change_nothing(engine, images) -> None:
    """Rows stopping at different steps, then a second turn: same ids as each row alone."""
    budgets, ages = [3, 9, 6], [None, 4, 60]
    params = SamplingParams(temperature=0, max_new_tokens=9)

    def run(rows: list[int]) -> list[list[int]]:
        features = engine.encode([images[r] for r in rows])
        batch = ChatBatch(engine.model, [[f] for f in features])
        first = [prompt_ids(engine, ages[r]) for r in rows]
        out = generate_turn(batch, first, params, max_new_tokens=[budgets[r] for r in rows])
        texts = [engine.tokenizer.stream_decode(g) for g in out]
        second = [
            prompt_ids(engine, ages[r], answer=t, question="Why?")
            for r, t in zip(rows, texts, strict=True)
        ]
        return [a + b for a, b in zip(out, generate_turn(batch, second, params), strict=True)]

    together = run([0, 1, 2])
    assert [len(t) for t in together] == [b + 9 for b in budgets]
    assert together == [run([r])[0] for r in range(3)]


def test_reusing_the_cached_prefix_gives_the_tokens_of_a_full_re_prefill(engine, images) -> None:
    contexts = [StudyContext(age_years=a) for a in AGES[:4]]
    cached = engine.generate(images[:4], contexts, temperature=0, max_new_tokens=12)
    engine.reuse_prefix = False
    try:
        full = engine.generate(images[:4], contexts, temperature=0, max_new_tokens=12)
    finally:
        engine.reuse_prefix = True
    assert [r.to_dict() | {"timings": {}} for r in cached] == [
        r.to_dict() | {"timings": {}} for r in full
    ]


def test_a_follow_up_turn_feeds_only_what_the_cache_lacks(engine, images) -> None:
    features = engine.encode(images[:2])
    batch = ChatBatch(engine.model, [[f] for f in features])
    first = [prompt_ids(engine), prompt_ids(engine, age=3)]
    generated = generate_turn(batch, first, SamplingParams(temperature=0, max_new_tokens=6))
    columns_before = batch.mask.shape[1]
    answers = [engine.tokenizer.stream_decode(g) for g in generated]
    second = [
        prompt_ids(engine, a, answer=ans, question="Why?")
        for a, ans in zip((None, 3), answers, strict=True)
    ]
    batch.extend(second)
    for row in range(2):
        assert batch.fed[row] == second[row]  # the cache now holds exactly the full chat
        assert int(batch.mask[row].sum()) == len(second[row]) - 1 + engine.config.num_image_tokens
    new_columns = batch.mask.shape[1] - columns_before
    assert new_columns < 40 < len(second[0])  # the image and the first turn were not re-fed


def test_a_cache_that_diverges_from_the_new_chat_is_cut_at_the_first_difference(engine, images):
    features = engine.encode(images[:1])
    base = prompt_ids(engine)
    changed = base[:-3] + [base[-1], base[-2], base[-3], 77, 78]
    reused = ChatBatch(engine.model, [[features[0]]])
    reused.extend([base + [50, 51, 52]])
    logits = reused.extend([changed])
    assert reused.fed[0] == changed
    fresh = ChatBatch(engine.model, [[features[0]]]).extend([changed])
    torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-4)


def test_image_embeddings_take_the_sentinels_place_for_1024_positions(engine, images) -> None:
    ids = prompt_ids(engine)
    at = ids.index(IMAGE_TOKEN_INDEX)
    features = engine.encode(images[:1])[0]
    batch = ChatBatch(engine.model, [[features]])
    logits = batch.extend([ids])
    assert batch.cols[0][at + 1] - batch.cols[0][at] == 1024
    with torch.inference_mode():
        embed = engine.model.embed_tokens
        x = torch.cat([embed(torch.tensor(ids[:at])), features, embed(torch.tensor(ids[at + 1 :]))])
        hidden = engine.model.llama(inputs_embeds=x[None]).last_hidden_state
        expected = engine.model.logits(hidden[:, -1]).float()
    assert x.shape[0] == len(ids) - 1 + 1024
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_generation_stops_at_eos_and_reports_it(eos_model, engine, images) -> None:
    features = eos_model.encode_images(engine.pixel_batch(images[:2]))
    batch = ChatBatch(eos_model, [[f] for f in features])
    out = generate_turn(batch, [prompt_ids(engine)] * 2, SamplingParams(temperature=0))
    assert out == [[2], [2]]


def test_ignore_eos_forces_exactly_max_new_tokens(eos_model, engine, images) -> None:
    features = eos_model.encode_images(engine.pixel_batch(images[:1]))
    batch = ChatBatch(eos_model, [[features[0]]])
    params = SamplingParams(temperature=0, max_new_tokens=7, ignore_eos=True)
    assert generate_turn(batch, [prompt_ids(engine)], params) == [[2] * 7]


def test_token_budget_is_capped_by_the_reference_context_formula(engine, images) -> None:
    ids = prompt_ids(engine)
    batch = ChatBatch(engine.model, [[engine.encode(images[:1])[0]]])
    params = SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True)
    out = generate_turn(batch, [ids], params, context_limit=len(ids) + 5)
    assert len(out[0]) == 4  # min(50, limit - len(ids) - 1)


def test_the_reference_keyword_check_stops_on_eos_spelled_in_text(engine) -> None:
    """KeywordsStoppingCriteria also stops when the last 3 tokens *read* "</s>"."""
    pieces = engine.tokenizer.sp.encode("clear</s>")  # plain pieces, not the special id 2
    assert 2 not in pieces and len(pieces) >= 3
    assert engine._keyword_stop(pieces)
    assert not engine._keyword_stop(pieces[:-1])


def test_seeded_sampling_is_reproducible_and_a_studys_draws_ignore_its_batch(engine, images):
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
    a = engine.generate(images[:1], seed=7, **kw)[0]
    b = engine.generate(images[:1], seed=7, **kw)[0]
    c = engine.generate(images[:1], seed=8, **kw)[0]
    batch = engine.generate(images[:3], seed=7, **kw)
    assert a.report == b.report == batch[0].report
    assert a.report != c.report

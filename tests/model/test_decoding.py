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
from model.decoder import SlotDecoder
from model.generate import SamplingParams, warp_logits
from model.pipeline import ReportEngine, StudyContext
from model.prompts import SYSTEM, PromptConfig
from model.scheduler import Conversation, Turn

AGES = [40, 5, None, 12, 70, 30, 2, 55]  # children get a longer prompt: left padding in turn 1


def prompt_ids(engine, age=None, answer=None, question=None) -> list[int]:
    first, _ = PromptConfig().report_message(age)
    chat = [Message("system", SYSTEM), Message("user", first)]
    if answer is not None:
        chat += [Message("assistant", answer), Message("user", question)]
    return tokenize_with_image(render_llama2(chat), engine.tokenizer)


@pytest.fixture
def eos_engine(tiny_dir):
    """The tiny engine with a head that always prefers EOS (id 2)."""
    engine = ReportEngine.load(tiny_dir, device="cpu")
    hidden, vocab = engine.model.lm_head.in_features, engine.model.lm_head.out_features
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[2] = 1.0
    engine.model.lm_head = head
    return engine


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


class Scripted(Conversation):
    """A conversation with fixed turns: each turn's ids come from ``make(previous answers)``."""

    def __init__(self, engine, image, turns, params, seed=0):
        self.pixels = torch.from_numpy(engine.pixel_batch([image])[0].numpy())
        self.seed = seed
        self.turns = list(turns)
        self.params = params
        self.answers: list[list[int]] = []

    def start(self) -> Turn:
        return Turn(self.turns[0]([]), self.params[0])

    def advance(self, generated):
        self.answers.append(generated)
        k = len(self.answers)
        if k == len(self.turns):
            return None
        return Turn(self.turns[k](self.answers), self.params[k])


def run_scripted(engine, conversations, slots, **options):
    scheduler = engine.scheduler(slots, **options)
    for c in conversations:
        scheduler.add(c)
    scheduler.run()
    done, failed = scheduler.drain()
    assert not failed, failed
    return scheduler


def two_turns(engine, age, budget):
    """Report prompt, then a "Why?" follow-up on the decoded answer."""

    def first(_):
        return prompt_ids(engine, age)

    def second(answers):
        text = engine.tokenizer.stream_decode(answers[0])
        return prompt_ids(engine, age, answer=text, question="Why?")

    params = [
        SamplingParams(temperature=0, max_new_tokens=budget),
        SamplingParams(temperature=0, max_new_tokens=9),
    ]
    return [first, second], params


def test_rows_that_stop_early_leave_stale_columns_that_change_nothing(engine, images) -> None:
    """Rows stopping at different steps, then a second turn: same ids as each row alone."""
    budgets, ages = [3, 9, 6], [None, 4, 60]

    def run(rows: list[int]) -> list[list[int]]:
        convs = [Scripted(engine, images[r], *two_turns(engine, ages[r], budgets[r])) for r in rows]
        run_scripted(engine, convs, slots=len(rows))
        return [c.answers[0] + c.answers[1] for c in convs]

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
    turns, params = two_turns(engine, None, 6)
    conv = Scripted(engine, images[0], turns, params)
    run_scripted(engine, [conv], slots=1)
    first = prompt_ids(engine)
    second = turns[1](conv.answers)
    fed_second_turn = conv.stats.prefill_tokens - (len(first) - 1 + 1024)
    assert fed_second_turn < 40 < len(second)  # the image and the first turn were not re-fed


def decoder_for(engine, slots=2, capacity=1400):
    return SlotDecoder(engine.model, slots, capacity)


def full_forward_logits(engine, ids, image) -> torch.Tensor:
    """Next-token logits of transformers' own LlamaModel on the whole spliced chat."""
    at = ids.index(IMAGE_TOKEN_INDEX)
    with torch.inference_mode():
        embed = engine.model.embed_tokens
        x = torch.cat([embed(torch.tensor(ids[:at])), image, embed(torch.tensor(ids[at + 1 :]))])
        hidden = engine.model.llama(inputs_embeds=x[None]).last_hidden_state
        return engine.model.logits(hidden[:, -1]).float()


def spliced(engine, ids, image, k=0) -> torch.Tensor:
    scheduler = engine.scheduler(1, capacity=1400)

    class _Slot:
        pass

    slot = _Slot()
    slot.image = image
    with torch.inference_mode():
        return scheduler._embed(slot, ids, k)


def test_image_embeddings_take_the_sentinels_place_for_1024_positions(engine, images) -> None:
    ids = prompt_ids(engine)
    features = engine.encode(images[:1])[0]
    x = spliced(engine, ids, features)
    assert x.shape[0] == len(ids) - 1 + 1024
    with torch.inference_mode():
        logits = decoder_for(engine).prefill([1], [0], [x])
    torch.testing.assert_close(
        logits, full_forward_logits(engine, ids, features), rtol=1e-4, atol=1e-4
    )


def test_decode_steps_give_the_logits_of_a_full_forward_in_every_slot(engine, images) -> None:
    """Two slots at different lengths, stepped together: each row's logits are those of
    transformers' LlamaModel run on that row's whole sequence."""
    features = engine.encode(images[:2])
    ids = [prompt_ids(engine), prompt_ids(engine, age=3)]
    dec = decoder_for(engine)
    with torch.inference_mode():
        for slot in (0, 1):
            x = spliced(engine, ids[slot], features[slot])
            dec.prefill([slot], [0], [x])
            dec.positions[slot] = x.shape[0]
        for step in range(3):
            dec.tokens[:] = torch.tensor([100 + step, 200 + step])
            logits = dec.decode(int(dec.positions.max()) + 1).clone()
            dec.positions += 1
            for slot in (0, 1):
                ids[slot] = ids[slot] + [int(dec.tokens[slot])]
                expected = full_forward_logits(engine, ids[slot], features[slot])
                torch.testing.assert_close(logits[slot : slot + 1], expected, rtol=1e-4, atol=1e-4)


def test_a_cache_that_diverges_from_the_new_chat_is_cut_at_the_first_difference(engine, images):
    features = engine.encode(images[:1])[0]
    base = prompt_ids(engine)
    changed = base[:-3] + [base[-1], base[-2], base[-3], 77, 78]

    turns = [lambda _: base + [50, 51, 52], lambda _: changed]
    params = [SamplingParams(temperature=0, max_new_tokens=1)] * 2
    conv = Scripted(engine, images[0], turns, params)
    run_scripted(engine, [conv], slots=1)
    k = len(base) - 3  # the first difference
    assert conv.stats.prefill_tokens == (len(base) + 3 - 1 + 1024) + (len(changed) - k)
    with torch.inference_mode():
        expected = full_forward_logits(engine, changed, features).argmax(-1).tolist()
    assert conv.answers[1] == expected


def one_turn(engine, model_images, budget, **params):
    turns = [lambda _: prompt_ids(engine)]
    return [
        Scripted(
            engine, im, turns, [SamplingParams(temperature=0, max_new_tokens=budget, **params)]
        )
        for im in model_images
    ]


def test_generation_stops_at_eos_and_reports_it(eos_engine, images) -> None:
    convs = one_turn(eos_engine, images[:2], 512)
    run_scripted(eos_engine, convs, slots=2)
    assert [c.answers for c in convs] == [[[2]], [[2]]]


def test_ignore_eos_forces_exactly_max_new_tokens(eos_engine, images) -> None:
    convs = one_turn(eos_engine, images[:1], 7, ignore_eos=True)
    run_scripted(eos_engine, convs, slots=1, sync_every=3)
    assert convs[0].answers == [[2] * 7]


def test_token_budget_is_capped_by_the_reference_context_formula(engine, images) -> None:
    ids = prompt_ids(engine)
    convs = one_turn(engine, images[:1], 50, ignore_eos=True)
    scheduler = engine.scheduler(1)
    scheduler.context_limit = len(ids) + 5
    scheduler.add(convs[0])
    scheduler.run()
    assert len(convs[0].answers[0]) == 4  # min(50, limit - len(ids) - 1)


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


def test_the_keyword_check_skips_decoding_only_where_it_cannot_fire(engine) -> None:
    """Every 3-token window of a long text: the shortcut answers as the full decode would."""
    tok = engine.tokenizer
    text = "clear </s> then </s><s>[INST] 3 > 2 and <0x3E> </ s> lungs</s>." * 3
    pieces = tok.sp.encode(text) + [2, 0, 5, 2, tok.vocab_size + 3]
    for end in range(1, len(pieces) + 1):
        window = pieces[:end]
        expected = tok.eos_token in tok.decode(window[-3:])
        assert engine._keyword_stop(window) == expected, window[-3:]

"""Continuous batching: studies join and leave the running batch without changing their output."""

from __future__ import annotations

import pytest
import torch
from test_decoding import AGES, Scripted, prompt_ids

from model.generate import SamplingParams
from model.pipeline import StudyContext


def run_studies(engine, images, contexts, slots, *, seeds=None, params=None, **options):
    params = params or [SamplingParams(temperature=0, max_new_tokens=8)] * len(images)
    studies = [
        engine.conversation(im, ctx, p, seed=None if seeds is None else seeds[i])
        for i, (im, ctx, p) in enumerate(zip(images, contexts, params, strict=True))
    ]
    scheduler = engine.scheduler(slots, **options)
    for s in studies:
        scheduler.add(s)
    scheduler.run()
    done, failed = scheduler.drain()
    assert not failed and len(done) == len(studies)
    return studies, scheduler


def answers(study) -> tuple[str, str, str]:
    r = study.result()
    return (r.report, r.differential, r.recommendation)


@pytest.mark.parametrize("sync_every", [1, 5])
def test_continuous_batching_output_matches_batch_one_greedy(engine, images, sync_every) -> None:
    """Eight studies through three slots, with different prompt lengths and budgets, so that
    studies finish at different steps and waiting ones take their slots mid-run."""
    contexts = [StudyContext(age_years=a) for a in AGES]
    params = [SamplingParams(temperature=0, max_new_tokens=4 + 3 * (i % 3)) for i in range(8)]
    together, scheduler = run_studies(
        engine, images, contexts, 3, params=params, sync_every=sync_every
    )
    assert scheduler.stats.row_steps > scheduler.stats.decode_steps  # rows did share steps
    for i in range(8):
        (alone,), _ = run_studies(
            engine, images[i : i + 1], contexts[i : i + 1], 1, params=params[i : i + 1]
        )
        assert answers(alone) == answers(together[i])


def test_a_finished_studys_slot_is_taken_by_a_waiting_study_while_others_decode(
    engine, images
) -> None:
    long, short = (
        SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (40, 3)
    )
    studies, _ = run_studies(
        engine, images[:3], [None] * 3, 2, params=[long, short, short], sync_every=2
    )
    first, second, third = (s.stats for s in studies)
    assert third.admitted > second.admitted  # it waited for a slot...
    assert third.admitted < first.finished  # ...and got one while the long study ran
    assert third.finished < first.finished
    assert first.peak_batch == 2


def test_a_keyword_stop_seen_late_cuts_the_row_back_to_it(engine, images) -> None:
    """The keyword check runs when the device state is read back; a row that decoded past it
    in the meantime gives the same ids, and the same next turn, as a check after every step."""

    def stop_after_third(ids):
        return len(ids) >= 3

    def run(sync_every):
        turns = [
            lambda _: prompt_ids(engine),
            lambda a: prompt_ids(
                engine, answer=engine.tokenizer.stream_decode(a[0]), question="Why?"
            ),
        ]
        params = [SamplingParams(temperature=0, max_new_tokens=20)] * 2
        conv = Scripted(engine, images[0], turns, params)
        scheduler = engine.scheduler(1, sync_every=sync_every)
        scheduler.stop = stop_after_third
        scheduler.add(conv)
        scheduler.run()
        return conv.answers

    stepwise = run(1)
    assert [len(a) for a in stepwise] == [3, 3]
    assert run(7) == stepwise


def test_studies_with_different_params_share_steps_and_keep_their_own_output(
    engine, images
) -> None:
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=9)
    mixed = [greedy, sampled, greedy, sampled]
    seeds = [11, 12, 13, 14]
    together, scheduler = run_studies(engine, images[:4], [None] * 4, 4, params=mixed, seeds=seeds)
    assert scheduler.stats.row_steps >= 3 * scheduler.stats.decode_steps // 2
    for i in range(4):
        (alone,), _ = run_studies(
            engine, images[i : i + 1], [None], 1, params=mixed[i : i + 1], seeds=seeds[i : i + 1]
        )
        assert answers(alone) == answers(together[i])


def test_a_chat_longer_than_the_slot_fails_that_study_with_advice(engine, images) -> None:
    study = engine.conversation(images[0], None, SamplingParams(temperature=0, max_new_tokens=4))
    scheduler = engine.scheduler(1, capacity=600)
    scheduler.add(study)
    scheduler.run()
    done, failed = scheduler.drain()
    assert not done
    assert "raise the capacity" in str(failed[0][1])


def test_the_sampling_counter_gives_distinct_draws_per_token_and_seed() -> None:
    from model.generate import gumbel_noise

    seed = torch.tensor([1, 1, 2])
    counter = torch.tensor([0, 1, 0])
    g = gumbel_noise(seed, counter, 1000)
    assert g.isfinite().all()
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])
    assert torch.equal(g, gumbel_noise(seed, counter, 1000))
    # Roughly Gumbel(0, 1): mean 0.577, variance pi^2 / 6.
    assert abs(float(g.mean()) - 0.5772) < 0.1 and abs(float(g.var()) - 1.645) < 0.2


def test_counter_based_draws_follow_the_warped_distribution() -> None:
    from model.generate import RowSampling, choose_tokens, warp_logits

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=4)
    sampling = RowSampling(20000, torch.device("cpu"))
    rows = torch.arange(20000)
    sampling.set_rows(rows, [params] * 20000, [5] * 20000)
    picks = choose_tokens(logits, sampling, rows, counter=rows, any_sampled=True)
    freq = torch.bincount(picks, minlength=6).float() / 20000
    expected = warp_logits(logits[:1], params).softmax(-1)[0]
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


class HostReads:
    """Counts every way a tensor's value can reach the host, while active."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch) -> None:
        self.active = False
        self.reads: list[str] = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def read(tensor, *args, **kwargs):
            if self.active:
                self.reads.append(name)
            return real(tensor, *args, **kwargs)

        return read


def test_the_decode_loop_reads_nothing_back_and_a_sync_reads_the_state_once(
    engine, images, monkeypatch
) -> None:
    """No host synchronisation per token: decode steps run on device tensors only, and the
    state comes back in one copy every ``sync_every`` steps."""
    scheduler = engine.scheduler(2, sync_every=6)
    for im in images[:2]:
        scheduler.add(
            engine.conversation(im, None, SamplingParams(temperature=0.7, max_new_tokens=12))
        )
    reads = HostReads(monkeypatch)
    decode, collect = scheduler._decode, scheduler._collect
    during: dict[str, list[list[str]]] = {"decode": [], "collect": []}

    def watched(name, step):
        def run():
            reads.reads = []
            reads.active = True
            try:
                step()
            finally:
                reads.active = False
            during[name].append(list(reads.reads))

        return run

    monkeypatch.setattr(scheduler, "_decode", watched("decode", decode))
    monkeypatch.setattr(scheduler, "_collect", watched("collect", collect))
    scheduler.run()
    assert scheduler.stats.decode_steps >= 12
    assert all(r == [] for r in during["decode"])  # sampling rows included (temperature 0.7)
    syncs = [r for r in during["collect"] if r]
    assert len(syncs) == scheduler.stats.syncs
    assert all(r.count("cpu") == 1 for r in syncs)
    assert scheduler.stats.syncs <= scheduler.stats.decode_steps // 6 + 2 * 3

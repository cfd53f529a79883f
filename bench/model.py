"""Model-engine benchmark: our three-turn conversation against the reference's way, and
decode throughput at batch 1 against batch B.

The model is a scaled-down CXR-LLaVA v2 written by ``model.tiny`` that keeps the published
image geometry (512 px, patch 16: 1024 image tokens per study), with a 4-layer, 512-wide LLaMA
and a 4-layer, 256-wide vision tower. Every turn generates exactly ``--new-tokens`` tokens
(EOS ignored) so runs are comparable.

(a) studies/min for report -> differential -> recommendation:
    ours       ``ReportEngine.generate``: B slots of a static KV cache, continuous batching,
               image encoded once, chat prefix kept in the cache across turns, logits only at
               the last prefill position;
    ours (B=1) the same one study at a time, to separate batching from the other levers;
    reference  one study at a time, every turn re-encodes the image, re-renders and re-reads
               the whole chat and computes logits at every prefill position, then decodes with
               a cache: what ``generate_cxr_repsonse`` does on each call (spec §2.3-2.4).
(b) decode tokens/s: the same decode loop at batch 1 and at batch B.
(c) with ``--quantization``: how often int8 / int4 weights (``model.quantize``) make the same
    greedy choice as full-precision weights, on the chats the full-precision model wrote
    (teacher forced), and how many studies get the same three answers.

Run::

    .venv/bin/python bench/model.py                      # CPU, batch 8
    .venv/bin/python bench/model.py --device cuda --batch 16 --new-tokens 64
    .venv/bin/python bench/model.py --quantization --checkpoint DIR
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is called model.py; run as a script, its folder would shadow the ``model`` package.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.chat import IMAGE_TOKEN_INDEX, Message, render_llama2, tokenize_with_image  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from model.pipeline import ReportEngine  # noqa: E402
from model.scheduler import Conversation, Turn  # noqa: E402
from model.tiny import TinySizes, make_tiny_checkpoint  # noqa: E402

BENCH_SIZES = TinySizes(
    vision_width=256,
    vision_layers=4,
    clip_embed_dim=64,
    hidden_size=512,
    intermediate_size=1376,
    num_layers=4,
    num_heads=8,
    num_kv_heads=8,
)


def study_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = 600 + 13 * k, 560 + 7 * k
        y, x = np.mgrid[0:h, 0:w]
        blob = 180 * np.exp(-((y - h * 0.4) ** 2 + (x - w * (0.3 + 0.05 * k)) ** 2) / 8000)
        out.append(np.clip(blob + rng.normal(40, 10, (h, w)), 0, 255).astype(np.uint8))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ reference-style loop
def reference_three_turns(engine: ReportEngine, image: np.ndarray, new_tokens: int) -> list[str]:
    """One study, the way the reference serves each call of a multi-turn chat."""
    model, tok, p = engine.model, engine.tokenizer, engine.prompts
    first, _ = p.report_message(None)
    chat = [Message("system", p.system), Message("user", first)]
    answers: list[str] = []
    for question in (None, p.differential, p.recommendation):
        if question is not None:
            chat += [Message("assistant", answers[-1]), Message("user", question)]
        ids = tokenize_with_image(render_llama2(chat), tok)
        with torch.inference_mode():
            features = model.encode_images(engine.pixel_batch([image]))[0]  # again, every turn
            at = ids.index(IMAGE_TOKEN_INDEX)
            dev = model.device
            embeds = torch.cat(
                [
                    model.embed_tokens(torch.tensor(ids[:at], device=dev)),
                    features,
                    model.embed_tokens(torch.tensor(ids[at + 1 :], device=dev)),
                ]
            )[None]
            out = model.llama(inputs_embeds=embeds, use_cache=True)
            logits = model.logits(out.last_hidden_state)  # every position, as the reference
            cache = out.past_key_values
            generated = [int(logits[0, -1].argmax())]
            for _ in range(new_tokens - 1):
                step = model.embed_tokens(torch.tensor([[generated[-1]]], device=dev))
                out = model.llama(inputs_embeds=step, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                generated.append(int(model.logits(out.last_hidden_state)[0, -1].argmax()))
        answers.append(tok.stream_decode(generated))
    return answers


# ------------------------------------------------------------------ measurements
def three_turn_rates(engine: ReportEngine, images, new_tokens: int, batch: int, repeats: int):
    """Per repeat: (ours studies/min, ours batch-1 studies/min, reference studies/min).

    The three are measured back to back in each repeat, so a burst of load from other
    processes hits all of them; ratios are taken per repeat.
    """
    kw = dict(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    device = engine.device
    engine.max_batch_size = batch
    engine.generate(images[:batch], **kw)  # warm-up
    rows = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        engine.generate(images[:batch], **kw)
        sync(device)
        ours = 60 * batch / (time.perf_counter() - t)
        t = time.perf_counter()
        for im in images[:2]:
            engine.generate([im], **kw)
        sync(device)
        ours_b1 = 60 * 2 / (time.perf_counter() - t)
        t = time.perf_counter()
        for im in images[:2]:
            reference_three_turns(engine, im, new_tokens)
        sync(device)
        rows.append((ours, ours_b1, 60 * 2 / (time.perf_counter() - t)))
    return rows


def decode_rate(engine: ReportEngine, images, batch: int, steps: int) -> float:
    """Tokens/s of the decode loop alone (after the prefill) for ``batch`` rows."""
    params = SamplingParams(temperature=0.0, max_new_tokens=steps + 1, ignore_eos=True)
    scheduler = engine.scheduler(batch, max_new_tokens=steps + 1, turns=1, sync_every=8)
    for image in images[:batch]:
        scheduler.add(OneTurn(engine.conversation(image, None, params)))
    scheduler.run()
    return batch * steps / scheduler.stats.decode_time


class OneTurn(Conversation):
    """A study's first turn only."""

    def __init__(self, study: Conversation) -> None:
        self.study = study
        self.pixels, self.seed, self.stats = study.pixels, study.seed, study.stats

    def start(self) -> Turn:
        return self.study.start()

    def advance(self, generated: list[int]) -> None:
        return None


# ------------------------------------------------------------------ quantization
def text_logits(engine: ReportEngine, ids: list[int], image: torch.Tensor) -> torch.Tensor:
    """Float32 logits at every text position after the image, on a fixed chat."""
    at = ids.index(IMAGE_TOKEN_INDEX)
    with torch.inference_mode():
        embed = engine.model.embed_tokens
        dev = engine.device
        x = torch.cat(
            [
                embed(torch.tensor(ids[:at], device=dev)),
                image,
                embed(torch.tensor(ids[at + 1 :], device=dev)),
            ]
        )
        hidden = engine.model.llama(inputs_embeds=x[None]).last_hidden_state
        return engine.model.logits(hidden[0, at + image.shape[0] :]).float().cpu()


def quantization_agreement(directory, device: str, images, new_tokens: int) -> None:
    reference = ReportEngine.load(directory, device=device)
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    studies = [reference.conversation(im, None, params) for im in images]
    scheduler = reference.scheduler(len(studies), max_new_tokens=new_tokens)
    for study in studies:
        scheduler.add(study)
    scheduler.run()
    chats = [study._turn(params).ids for study in studies]  # the chat with two answers
    answers = [study.result() for study in studies]
    base = [
        text_logits(reference, c, reference.encode([im])[0])
        for c, im in zip(chats, images, strict=True)
    ]
    every = torch.cat(base)
    top2 = every.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).median() / every.std())
    print(f"(c) quantized weights vs {reference.model.dtype} weights, {len(images)} studies")
    print(f"    median top-1 margin of the full-precision model: {margin:.3f} logit std")
    for mode in ("int8", "int4"):
        engine = ReportEngine.load(directory, device=device, quantize=mode)
        got = [
            text_logits(engine, c, engine.encode([im])[0])
            for c, im in zip(chats, images, strict=True)
        ]
        same = sum(
            int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(base, got, strict=True)
        )
        total = sum(a.shape[0] for a in base)
        error = float((torch.cat(got) - every).pow(2).mean().sqrt() / every.std())
        results = engine.generate(
            images, temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True
        )
        identical = sum(
            (r.report, r.differential, r.recommendation)
            == (a.report, a.differential, a.recommendation)
            for r, a in zip(results, answers, strict=True)
        )
        print(
            f"    {mode}: teacher-forced greedy agreement {same / total:.3f} ({same}/{total} "
            f"positions); logit RMS error {error:.3f} logit std; identical three answers "
            f"{identical}/{len(images)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per turn (EOS ignored)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--checkpoint", type=Path, help="reuse a bench checkpoint directory")
    ap.add_argument("--quantization", action="store_true", help="only (c), int8/int4 agreement")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoint or make_tiny_checkpoint(Path(tmp) / "bench", sizes=BENCH_SIZES)
        images = study_images(max(args.batch, 2))
        if args.quantization:
            quantization_agreement(directory, args.device, images, args.new_tokens)
            return
        engine = ReportEngine.load(directory, device=args.device)
        print(
            f"device={engine.device} dtype={engine.model.dtype} threads={torch.get_num_threads()} "
            f"batch={args.batch} new_tokens/turn={args.new_tokens} "
            f"image_tokens={engine.config.num_image_tokens}"
        )
        rows = three_turn_rates(engine, images, args.new_tokens, args.batch, args.repeats)
        ours, ours_b1, ref = (statistics.median(col) for col in zip(*rows, strict=True))
        ratio = statistics.median(o / r for o, _, r in rows)
        ratio_b1 = statistics.median(o1 / r for _, o1, r in rows)
        print("(a) three-turn conversation, studies/min (medians over repeats)")
        print(f"    ours, batch {args.batch:<3}          {ours:9.1f}")
        print(f"    ours, batch 1             {ours_b1:9.1f}")
        print(f"    reference style, batch 1  {ref:9.1f}")
        print(f"    ratio ours/reference      {ratio:9.2f}x  (goal >= 3x)")
        print(f"    ratio ours-b1/reference   {ratio_b1:9.2f}x")
        engine.generate(images[:1], temperature=0.0, max_new_tokens=4)  # warm-up
        pairs = [
            (
                decode_rate(engine, images, 1, args.decode_steps),
                decode_rate(engine, images, args.batch, args.decode_steps),
            )
            for _ in range(args.repeats)
        ]
        one, many = (statistics.median(col) for col in zip(*pairs, strict=True))
        print("(b) decode throughput, tokens/s (medians over repeats)")
        print(f"    batch 1                   {one:9.1f}")
        print(f"    batch {args.batch:<3}                 {many:9.1f}")
        ratio_dec = statistics.median(m / o for o, m in pairs)
        print(f"    ratio                     {ratio_dec:9.2f}x  (goal >= 4x)")


if __name__ == "__main__":
    main()

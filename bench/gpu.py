"""Studies per second per GPU at the published CXR-LLaVA v2 shapes, beside the physical limits.

The model is built with random weights directly on the device (meta-device construction, then
``to_empty`` and in-place random init: seconds, no checkpoint), from the published config:
ViT-L/16 at 512 px (1024 image tokens), LLaMA-2-7B shapes, bf16. Its output is noise, but the
cost of a study is the shapes. Every study is the three-turn conversation with forced answer
lengths (report 160, differential 48, recommendation 48 tokens; EOS ignored) and prompts of the
reference's lengths, so runs compare.

Measured in one run:

* reference style: one study at a time; every turn re-encodes the image and re-feeds the whole
  chat through transformers' ``LlamaModel`` with its dynamic cache, logits at every prefill
  position, then a token-by-token loop that reads each token back to the host (what
  ``generate`` does with the reference's stopping criteria);
* ours at each batch size B (``model.scheduler``: static slot cache, CUDA-graph decode, prefix
  reuse, continuous batching): ``--studies-per-slot`` x B studies submitted at once, so slots
  are handed over mid-run; studies/s, decode and prefill tokens/s, time to first token, peak
  memory;
* the limits: a decode step cannot be faster than (decoder weights + the KV cache it reads) /
  memory bandwidth, measured here with a device-to-device copy; prefill cannot beat its FLOPs /
  the measured dense matmul rate.

Prints a table, then one JSON line. ``--tiny`` (the default without CUDA) runs the same
measurements on the tiny config (CPU, fp32) so CI can run it.

It runs on a bare GPU image, from the repository root, with nothing installed but torch (2.11 or
newer), transformers (5.17 or newer), safetensors, sentencepiece, numpy and pillow: no project
install, no pip. What it imports from ``model/`` imports only those and the standard library
(checked by tests/model/test_gpu_bench.py). Batch sizes that would not finish within
``--budget-s`` (default 8 minutes in all) are skipped and named.

Run::

    python3 bench/gpu.py                                # CUDA: full size, batches 1, 8, 32
    python3 bench/gpu.py --batches 1,8,16,32,64         # more batch sizes, if time allows
    python3 bench/gpu.py --tiny --batches 1,8           # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this folder would shadow the ``model`` package with bench/model.py.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import torch  # noqa: E402

from model.chat import IMAGE_TOKEN_INDEX  # noqa: E402
from model.config import CXRLLaVAConfig  # noqa: E402
from model.decoder import kv_bytes_per_token  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from model.modeling import CXRLLaVAModel  # noqa: E402
from model.scheduler import Conversation, Scheduler, StudyStats, Turn  # noqa: E402
from model.tiny import FULL_SIZES, TinySizes, tiny_config_dict  # noqa: E402

GIB = 1024**3
# Prompt lengths of the reference's chat with the LLaMA-2 tokenizer (ids before and after the
# image sentinel in turn 1; ids a follow-up adds around its question).
PROMPT_BEFORE, PROMPT_AFTER = 35, 60
QUESTION = (18, 14)


def published_config() -> CXRLLaVAConfig:
    """config.json of ECOFRI/CXR-LLAVA-v2 (spec §1.2), LLaMA-2-7B shapes for ``llama``."""
    return CXRLLaVAConfig.from_dict(tiny_config_dict(FULL_SIZES, 32000))


def tiny_config() -> CXRLLaVAConfig:
    return CXRLLaVAConfig.from_dict(tiny_config_dict(TinySizes(), 1300))


def random_model(config: CXRLLaVAConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The model with random weights, allocated once, directly on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CXRLLaVAModel(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 and ("norm" in name or ".ln" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.reset_rotary()
    model.eval()
    model.requires_grad_(False)
    return model


class SyntheticStudy(Conversation):
    """Three turns of forced lengths over random ids, shaped like the reference's chat.

    A follow-up turn is the previous chat, the answer verbatim, then EOS/BOS and the question,
    as the re-tokenized chat would be.
    """

    def __init__(self, config: CXRLLaVAConfig, lengths: list[int], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        vocab = config.vocab_size

        def ids(n: int) -> list[int]:
            return torch.randint(3, vocab, (n,), generator=gen).tolist()

        size = config.image_size
        self.pixels = torch.randn(1, size, size, generator=gen)
        self.seed = seed
        self.stats = StudyStats()
        self.lengths = lengths
        self.questions = [ids(n) for n in QUESTION]
        self.chat = [1, 1, *ids(PROMPT_BEFORE), IMAGE_TOKEN_INDEX, *ids(PROMPT_AFTER)]
        self.answers: list[list[int]] = []

    def params(self, turn: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_new_tokens=self.lengths[turn], ignore_eos=True)

    def start(self) -> Turn:
        return Turn(list(self.chat), self.params(0))

    def advance(self, generated: list[int]) -> Turn | None:
        self.answers.append(generated)
        turn = len(self.answers)
        if turn == len(self.lengths):
            return None
        self.chat += [*generated, 2, 1, *self.questions[(turn - 1) % len(self.questions)]]
        return Turn(list(self.chat), self.params(turn))


def positions_needed(config: CXRLLaVAConfig, lengths: list[int]) -> int:
    text = PROMPT_BEFORE + PROMPT_AFTER + 2 + sum(lengths) + sum(q + 2 for q in QUESTION)
    return config.num_image_tokens + text + 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ------------------------------------------------------------------ physical limits
def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (each copy reads and writes ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t)


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def decoder_weight_bytes(model: CXRLLaVAModel) -> int:
    """Bytes a decode step must read: every decoder layer, the final norm and the LM head."""
    tensors = [*model.llama.layers.parameters(), *model.llama.norm.parameters()]
    tensors.append(model.lm_head.weight)
    return sum(t.numel() * t.element_size() for t in tensors)


def decoder_params(model: CXRLLaVAModel) -> int:
    return sum(p.numel() for p in model.llama.layers.parameters())


# ------------------------------------------------------------------ the two ways
def reference_study(model: CXRLLaVAModel, study: SyntheticStudy) -> dict[str, float]:
    """One study the reference's way; returns its timings."""
    dev = model.device
    out = {"prefill": 0.0, "decode": 0.0, "encode": 0.0, "prefill_tokens": 0, "tokens": 0}
    t_start = time.perf_counter()
    turn = study.start()
    with torch.inference_mode():
        while turn is not None:
            t0 = time.perf_counter()
            image = model.encode_images(study.pixels[None].to(dev))[0]  # again, every turn
            sync(dev)
            t1 = time.perf_counter()
            ids = turn.ids
            at = ids.index(IMAGE_TOKEN_INDEX)
            embeds = torch.cat(
                [
                    model.embed_tokens(torch.tensor(ids[:at], device=dev)),
                    image,
                    model.embed_tokens(torch.tensor(ids[at + 1 :], device=dev)),
                ]
            )[None]
            hidden = model.llama(inputs_embeds=embeds, use_cache=True)
            logits = model.logits(hidden.last_hidden_state)  # every position, as the reference
            cache = hidden.past_key_values
            generated = [int(logits[0, -1].argmax())]  # read back to check the stop criteria
            t2 = time.perf_counter()
            out.setdefault("first_token", t2 - t_start)
            for _ in range(turn.params.max_new_tokens - 1):
                step = model.embed_tokens(torch.tensor([[generated[-1]]], device=dev))
                hidden = model.llama(inputs_embeds=step, past_key_values=cache, use_cache=True)
                cache = hidden.past_key_values
                generated.append(int(model.logits(hidden.last_hidden_state)[0, -1].argmax()))
            t3 = time.perf_counter()
            out["encode"] += t1 - t0
            out["prefill"] += t2 - t1
            out["decode"] += t3 - t2
            out["prefill_tokens"] += embeds.shape[1]
            out["tokens"] += len(generated)
            turn = study.advance(generated)
    out["total"] = time.perf_counter() - t_start
    return out


def run_reference(model, config, lengths, studies: int) -> dict[str, float]:
    dev = model.device
    reset_peak(dev)
    runs = [
        reference_study(model, SyntheticStudy(config, lengths, 1000 + k)) for k in range(studies)
    ]
    total = sum(r["total"] for r in runs)
    return {
        "batch": 1,
        "studies": studies,
        "studies_per_s": studies / total,
        "decode_tok_s": sum(r["tokens"] - 3 for r in runs) / sum(r["decode"] for r in runs),
        "prefill_tok_s": sum(r["prefill_tokens"] for r in runs) / sum(r["prefill"] for r in runs),
        "ttft_s": statistics.median(r["first_token"] for r in runs),
        "peak_mem_gib": peak_gib(dev),
    }


def run_ours(model, config, lengths, batch: int, studies: int, sync_every: int) -> dict:
    dev = model.device
    reset_peak(dev)
    scheduler = Scheduler(
        model,
        slots=batch,
        capacity=positions_needed(config, lengths),
        sync_every=sync_every,
        prefill_tokens=16384 if dev.type == "cuda" else 8192,
    )
    scheduler.decoder.warm_up()
    convs = [SyntheticStudy(config, lengths, k) for k in range(studies)]
    sync(dev)
    t0 = time.perf_counter()
    for c in convs:
        c.stats = StudyStats(submitted=t0)
        scheduler.add(c)
    scheduler.run()
    wall = time.perf_counter() - t0
    done, failed = scheduler.drain()
    if failed:
        raise failed[0][1]
    s = scheduler.stats
    generated = sum(c.stats.generated_tokens for c in convs)
    first_wave = convs[:batch]
    return {
        "batch": batch,
        "studies": studies,
        "wall_s": wall,
        "studies_per_s": studies / wall,
        "decode_tok_s": (generated - 3 * studies) / s.decode_time if s.decode_time else None,
        "prefill_tok_s": s.prefill_tokens / s.prefill_time,
        "ttft_s": statistics.median(c.stats.first_token - c.stats.submitted for c in first_wave),
        "peak_mem_gib": peak_gib(dev),
        "kv_cache_gib": scheduler.decoder.nbytes / GIB,
        "step_ms": 1000 * s.decode_time / s.decode_steps if s.decode_steps else None,
        "rows_per_step": s.row_steps / s.decode_steps if s.decode_steps else None,
        "context_per_step": s.context_sum / s.decode_steps if s.decode_steps else None,
        "prefill_s": s.prefill_time,
        "prefill_tokens": s.prefill_tokens,
        "prefill_pairs": s.prefill_pairs,
        "encode_s": s.encode_time,
        "syncs": s.syncs,
    }


# ------------------------------------------------------------------ main
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (default on CPU)")
    ap.add_argument("--batches", type=parse_ints, default=None, help="default 1,8,32")
    ap.add_argument("--tokens", type=parse_ints, default=[160, 48, 48], help="forced per turn")
    ap.add_argument("--studies-per-slot", type=int, default=2)
    ap.add_argument("--reference-studies", type=int, default=2)
    ap.add_argument("--sync-every", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=480, help="skip batch sizes past this")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tiny = args.tiny or device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = args.batches or ([1, 8, 32] if not tiny else [1, 8, 16])
    lengths = args.tokens
    if len(lengths) != 3:
        ap.error("--tokens takes three lengths: report, differential, recommendation")
    started = time.perf_counter()

    config = tiny_config() if tiny else published_config()
    t = time.perf_counter()
    model = random_model(config, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t
    weights = decoder_weight_bytes(model)
    per_token = kv_bytes_per_token(model)
    bandwidth = measure_bandwidth(device, (2 * GIB) if device.type == "cuda" else 256 * 1024**2)
    matmul = measure_matmul(device, dtype, 8192 if device.type == "cuda" else 1024)
    flops_per_token = 2 * decoder_params(model)
    attn_flops_per_pair = 4 * model.llama.config.num_hidden_layers * config.hidden_size

    # Warm-up: kernels, allocator, one study through each path.
    run_ours(model, config, [4, 2, 2], 1, 1, args.sync_every)
    reference_study(model, SyntheticStudy(config, [2, 2, 2], 7))

    reference = run_reference(model, config, lengths, args.reference_studies)
    rows, skipped = [], []
    per_study_s = 1 / reference["studies_per_s"]
    for batch in batches:
        studies = batch * args.studies_per_slot
        predicted = studies * per_study_s
        elapsed = time.perf_counter() - started
        if elapsed + predicted > args.budget_s:
            skipped.append({"batch": batch, "predicted_s": round(predicted, 1)})
            print(f"skipped batch {batch}: predicted {predicted:.0f} s, {elapsed:.0f} s used")
            continue
        try:
            row = run_ours(model, config, lengths, batch, studies, args.sync_every)
        except (torch.OutOfMemoryError, ValueError) as exc:
            skipped.append({"batch": batch, "error": str(exc).splitlines()[0]})
            print(f"skipped batch {batch}: {exc}")
            continue
        per_study_s = 1 / row["studies_per_s"]
        step_limit = (weights + row["context_per_step"] * per_token) / bandwidth
        prefill_ideal = (
            flops_per_token * row["prefill_tokens"] + attn_flops_per_pair * row["prefill_pairs"]
        ) / matmul
        row |= {
            "step_limit_ms": 1000 * step_limit,
            "step_vs_limit": row["step_ms"] / (1000 * step_limit) if row["step_ms"] else None,
            "prefill_vs_matmul_limit": row["prefill_s"] / prefill_ideal,
            "speedup_vs_reference": row["studies_per_s"] / reference["studies_per_s"],
        }
        rows.append(row)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "tokens_per_turn": lengths,
        "image_tokens": config.num_image_tokens,
        "build_s": build_s,
        "decoder_weight_gib": weights / GIB,
        "kv_bytes_per_token": per_token,
        "bandwidth_gbps": bandwidth / 1e9,
        "matmul_tflops": matmul / 1e12,
        "reference": reference,
        "ours": rows,
        "skipped": skipped,
        "total_s": time.perf_counter() - started,
    }
    print_table(report)
    print(json.dumps(report, separators=(",", ":")))
    return report


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(r: dict) -> None:
    print(
        f"{r['device']} {r['dtype']} {'tiny' if r['tiny'] else 'CXR-LLaVA v2 7B shapes'}, "
        f"tokens/turn {r['tokens_per_turn']}, image tokens {r['image_tokens']}; "
        f"copy bandwidth {r['bandwidth_gbps']:.1f} GB/s, matmul {r['matmul_tflops']:.2f} TFLOP/s"
    )
    head = (
        f"{'':12}{'studies/s':>10}{'x ref':>7}{'dec tok/s':>11}{'pre tok/s':>11}{'TTFT s':>8}"
        f"{'step ms':>9}{'limit ms':>9}{'x limit':>8}{'pre x lim':>10}{'peak GiB':>9}"
    )
    print(head)
    ref = r["reference"]
    print(
        f"{'reference':12}{ref['studies_per_s']:>10.3f}{1:>7.2f}{ref['decode_tok_s']:>11.1f}"
        f"{ref['prefill_tok_s']:>11.0f}{ref['ttft_s']:>8.3f}{'':>9}{'':>9}{'':>8}{'':>10}"
        f"{_f(ref['peak_mem_gib'], '.1f'):>9}"
    )
    for row in r["ours"]:
        print(
            f"{'ours B=' + str(row['batch']):12}{row['studies_per_s']:>10.3f}"
            f"{row['speedup_vs_reference']:>7.2f}{_f(row['decode_tok_s'], '.1f'):>11}"
            f"{row['prefill_tok_s']:>11.0f}{row['ttft_s']:>8.3f}{_f(row['step_ms'], '.2f'):>9}"
            f"{row['step_limit_ms']:>9.3f}{_f(row['step_vs_limit'], '.1f'):>8}"
            f"{row['prefill_vs_matmul_limit']:>10.1f}{_f(row['peak_mem_gib'], '.1f'):>9}"
        )
    for s in r["skipped"]:
        why = s.get("error") or f"predicted {s['predicted_s']} s, over the time budget"
        print(f"skipped B={s['batch']}: {why}")


if __name__ == "__main__":
    main()

"""How the next token is chosen: the reference's sampling rules, per row, on the device.

Sampling follows the reference's generate (transformers 4.36, docs/model.md, "Decoding"): ``do_sample`` iff
``temperature > 0.001``; warpers in the order temperature -> top-k -> top-p; greedy is argmax.
Every rule is applied per row with the row's own parameters (``RowSampling``), so studies with
different ``GenerationParams`` can share a decode step, and nothing here reads a value back to
the host: the decode loop can run many steps without a synchronisation.

Draws are counter-based rather than taken from a stateful generator: a sampled row picks
``argmax(scores + gumbel)`` (the Gumbel-max trick, an exact draw from ``softmax(scores)``), with
noise hashed from (the study's seed, the index of the token in the study's conversation, the
vocabulary id). A study's draws therefore do not depend on which other studies share its steps,
on the step at which it joined, or on steps its slot computed after it had stopped.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

EOS_TOKEN_ID = 2
GREEDY_BELOW = 0.001  # the reference samples only when temperature > 0.001
MAX_NEW_TOKENS = 512  # the reference's cap on one answer


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; the defaults are the reference helpers' (docs/model.md, "Decoding").

    ``ignore_eos`` makes every row generate exactly ``max_new_tokens`` tokens (benchmarks).
    """

    temperature: float = 0.2
    top_p: float = 0.8
    top_k: int = 50
    max_new_tokens: int = 512
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, found {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], found {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), found {self.top_k}.")
        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(
                f"max_new_tokens must be in [0, {MAX_NEW_TOKENS}] (the reference's cap on one "
                f"answer), found {self.max_new_tokens}."
            )

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


def new_seed() -> int:
    """A random 62-bit seed for a study that was given none."""
    return secrets.randbits(62)


class RowSampling:
    """Per-slot sampling parameters as device tensors, set when a slot starts a turn."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.temperature = torch.ones(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)

    def set_rows(
        self, rows: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int]
    ) -> None:
        """Give slots ``rows`` their turn's parameters and their study's seed."""
        dev = rows.device
        # Greedy rows never use the warped scores; temperature 1 keeps them finite.
        self.temperature[rows] = torch.tensor(
            [1.0 if p.greedy else p.temperature for p in params], device=dev
        )
        self.top_k[rows] = torch.tensor([p.top_k for p in params], device=dev)
        self.top_p[rows] = torch.tensor([p.top_p for p in params], device=dev)
        self.greedy[rows] = torch.tensor([p.greedy for p in params], device=dev)
        self.seed[rows] = torch.tensor([s & ((1 << 62) - 1) for s in seeds], device=dev)


def warp_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[B, V] float32 logits -> warped scores (-inf where removed), each row with its own
    temperature [B], top_k [B] (0: off) and top_p [B] (1: off), as transformers' warpers."""
    vocab = logits.shape[-1]
    scores = logits / temperature[:, None]
    # Top-k: drop scores below the k-th largest (ties with it are kept, as TopKLogitsWarper).
    k = top_k.clamp(max=vocab)
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1).clamp(min=0)[:, None])
    kth = torch.where((k > 0)[:, None], kth, torch.full_like(kth, float("-inf")))
    scores = scores.masked_fill(scores < kth, float("-inf"))
    # Top-p: drop the smallest tokens whose cumulative probability stays <= 1 - top_p.
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)[:, None]
    drop_sorted[..., -1:] = False  # always keep the most likely token
    drop_sorted &= (top_p < 1.0)[:, None]  # top_p == 1 adds no warper in transformers
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``warp_rows`` with the same parameters for every row."""
    rows = logits.shape[0]
    dev = logits.device
    return warp_rows(
        logits,
        torch.full((rows,), params.temperature, device=dev),
        torch.full((rows,), params.top_k, dtype=torch.long, device=dev),
        torch.full((rows,), params.top_p, device=dev),
    )


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2**32.

    Both multipliers are below 2**31, so no product leaves the int64 range.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] standard Gumbel noise, a pure function of (seed[b], counter[b], token id)."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = _mix32(_mix32(lo ^ _mix32(hi + 0x3C6EF372)) ^ counter)  # [B]
    ids = torch.arange(vocab, device=seed.device)
    bits = _mix32(_mix32(key[:, None] ^ ids[None, :]) + 0x9E3779B9)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exact in float32
    return -torch.log(-torch.log(uniform))


def choose_tokens(
    logits: torch.Tensor,
    sampling: RowSampling,
    rows: torch.Tensor,
    counter: torch.Tensor,
    any_sampled: bool,
) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V] (rows ``rows`` of ``sampling``): argmax when the
    row is greedy, else a draw from the warped distribution. ``counter`` [B] is the index of the
    token in its study; ``any_sampled`` (known on the host) skips the warpers when all are greedy.
    """
    greedy_pick = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy_pick
    scores = warp_rows(
        logits, sampling.temperature[rows], sampling.top_k[rows], sampling.top_p[rows]
    )
    drawn = (scores + gumbel_noise(sampling.seed[rows], counter, logits.shape[-1])).argmax(-1)
    return torch.where(sampling.greedy[rows], greedy_pick, drawn)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

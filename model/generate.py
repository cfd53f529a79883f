"""Batched decoding over one KV cache that lives for the whole conversation.

``ChatBatch`` holds B chats in one KV cache. Each row's cache columns are a left-padded
prefill followed by one column per decode step; columns a row must not see (left padding,
steps after the row stopped, text that a later turn re-tokenized differently) stay in the cache
but are masked out, and every row's RoPE positions count only its visible tokens. That keeps
the arithmetic of a row the same whatever else is in the batch, which is why a study's greedy
output does not change when it is batched.

A new turn is given as the row's *complete* token sequence, exactly what a full re-prefill
would feed (the reference re-renders and re-tokenizes the whole chat every turn, spec §2.2).
``ChatBatch.extend`` keeps the longest prefix that the cache already holds and feeds only the
rest, so the chat prefix, the 1024 image embeddings included, is computed once. Re-tokenized
answers usually match the generated ids; where they do not, the cache is truncated at the first
difference, so the tokens the model conditions on are always those of a full re-prefill.

Sampling follows the reference's generate (transformers 4.36): ``do_sample`` iff
``temperature > 0.001``; warpers in the order temperature -> top-k -> top-p; greedy is argmax.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from model.chat import IMAGE_TOKEN_INDEX
from model.modeling import CXRLLaVAModel

EOS_TOKEN_ID = 2
GREEDY_BELOW = 0.001  # the reference samples only when temperature > 0.001
MAX_NEW_TOKENS = 512  # the reference's cap on one answer


class AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare capacity instead of ``torch.cat``-ing.

    ``DynamicLayer.update`` concatenates, copying the whole cache on every decode step: O(T)
    memory traffic per token, which at batch 8 with ~1100 cached positions cost more than the
    attention itself. Here keys/values live in a buffer that grows by half when full, and
    ``keys``/``values`` are views of its filled part, so the attention code sees the same
    tensors as before.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        need = self._length + key_states.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            capacity = need + max(256, need // 2)
            self._k = _grow(self._k, key_states, self._length, capacity)
            self._v = _grow(self._v, value_states, self._length, capacity)
        self._k[..., self._length : need, :] = key_states
        self._v[..., self._length : need, :] = value_states
        self._length = need
        self.keys = self._k[..., :need, :]
        self.values = self._v[..., :need, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        self._length = 0
        super().reset()


def _grow(old: torch.Tensor | None, like: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    shape = (*like.shape[:-2], capacity, like.shape[-1])
    new = torch.empty(shape, dtype=like.dtype, device=like.device)
    if old is not None and length:
        new[..., :length, :] = old[..., :length, :]
    return new


class KVCache(Cache):
    """The decoder's cache for a whole conversation: one ``AppendLayer`` per LLaMA layer."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=AppendLayer)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; the defaults are the reference helpers' (spec §2.4).

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


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] float32 logits -> warped scores (-inf where removed): temperature, top-k, top-p."""
    scores = logits
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator] | None,
    live: Sequence[bool],
) -> list[int]:
    """Next token per row: argmax when greedy, else one multinomial draw per live row."""
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    probs = warp_logits(logits.float(), params).softmax(dim=-1)
    picks = []
    for i, is_live in enumerate(live):
        if not is_live:
            picks.append(0)
            continue
        gen = generators[i] if generators else None
        picks.append(int(torch.multinomial(probs[i], 1, generator=gen)))
    return picks


def make_generators(
    batch: int, seed: int | None, device: torch.device
) -> list[torch.Generator] | None:
    """One generator per row, seeded ``seed + row`` so a row's draws ignore the other rows."""
    gens = []
    for i in range(batch):
        g = torch.Generator(device=device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed + i)
        gens.append(g)
    return gens


@dataclass
class ChatBatch:
    """B chats sharing one KV cache; see the module docstring for the column layout.

    Parameters
    ----------
    model:
        The loaded model (any device, any dtype).
    images:
        Per row, the projected image embeddings ([N, hidden] each) in the order the row's
        ``IMAGE_TOKEN_INDEX`` sentinels appear; encoded once by the caller.
    reuse_prefix:
        ``False`` re-prefills every row from scratch on each ``extend`` (what the reference
        does); used to check that prefix reuse changes nothing.
    """

    model: CXRLLaVAModel
    images: list[list[torch.Tensor]]
    reuse_prefix: bool = True
    fed: list[list[int]] = field(init=False)
    cols: list[list[int]] = field(init=False)
    timings: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.batch = len(self.images)
        self.device = self.model.device
        self.timings = {"prefill": 0.0, "decode": 0.0}
        self._reset()

    def _reset(self) -> None:
        self.cache = KVCache()
        self.mask = torch.zeros(self.batch, 0, dtype=torch.bool, device=self.device)
        self.fed = [[] for _ in range(self.batch)]  # ids in the cache (sentinel for an image)
        self.cols = [[] for _ in range(self.batch)]  # first cache column of each fed id
        self.seen = [0] * self.batch  # visible positions per row (the next RoPE position)

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.num_image_tokens

    # ---------------------------------------------------------------- prefill
    @torch.inference_mode()
    def extend(self, sequences: Sequence[list[int] | None]) -> torch.Tensor:
        """Make each row's chat equal ``sequences[i]`` and return next-token logits [B, V].

        ``None`` leaves a row untouched (its logits are meaningless). At least one id of every
        given sequence is fed, because logits are only kept for the last position.
        """
        if len(sequences) != self.batch:
            raise ValueError(f"expected {self.batch} sequences, found {len(sequences)}.")
        if not self.reuse_prefix and self.mask.shape[1]:
            keep = [
                list(s) if s is not None else (list(f) or None)
                for s, f in zip(sequences, self.fed, strict=True)
            ]
            self._reset()
            sequences = keep
        suffixes: list[list[int]] = []
        starts: list[int] = []
        for i, seq in enumerate(sequences):
            if seq is None:
                suffixes.append([])
                starts.append(0)
                continue
            if not seq:
                raise ValueError(f"row {i}: an empty token sequence cannot be fed.")
            k = _common_prefix(self.fed[i], seq)
            k = min(k, len(seq) - 1)
            if k < len(self.fed[i]):
                self._truncate(i, k)
            suffixes.append(list(seq[k:]))
            starts.append(k)
        return self._feed(suffixes, starts)

    def _truncate(self, row: int, k: int) -> None:
        """Hide everything from fed item ``k`` on (the cache keeps the columns, masked)."""
        self.mask[row, self.cols[row][k] :] = False
        self.fed[row] = self.fed[row][:k]
        self.cols[row] = self.cols[row][:k]
        self.seen[row] = int(self.mask[row].sum())

    def _feed(self, suffixes: list[list[int]], starts: list[int]) -> torch.Tensor:
        n_img = self.num_image_tokens
        embeds, lengths = [], []
        for i, (suffix, start) in enumerate(zip(suffixes, starts, strict=True)):
            image_index = self.fed[i][:start].count(IMAGE_TOKEN_INDEX)
            parts, run = [], []
            for tok in suffix:
                if tok == IMAGE_TOKEN_INDEX:
                    if run:
                        parts.append(self._embed(run))
                        run = []
                    if image_index >= len(self.images[i]):
                        raise ValueError(
                            f"row {i} has more <image> sentinels than images "
                            f"({len(self.images[i])})."
                        )
                    parts.append(self.images[i][image_index].to(self.model.dtype))
                    image_index += 1
                else:
                    run.append(tok)
            if run:
                parts.append(self._embed(run))
            embeds.append(torch.cat(parts) if parts else None)
            lengths.append(sum(p.shape[0] for p in parts))
        width = max(lengths)
        if width == 0:
            raise ValueError("nothing to feed: every row is idle.")
        hidden = self.model.config.hidden_size
        x = torch.zeros(self.batch, width, hidden, dtype=self.model.dtype, device=self.device)
        new_mask = torch.zeros(self.batch, width, dtype=torch.bool, device=self.device)
        positions = torch.zeros(self.batch, width, dtype=torch.long, device=self.device)
        base = self.mask.shape[1]
        for i, (e, n) in enumerate(zip(embeds, lengths, strict=True)):
            if not n:
                continue
            pad = width - n
            x[i, pad:] = e
            new_mask[i, pad:] = True
            positions[i, pad:] = torch.arange(self.seen[i], self.seen[i] + n, device=self.device)
            col = base + pad
            for tok in suffixes[i]:
                self.fed[i].append(tok)
                self.cols[i].append(col)
                col += n_img if tok == IMAGE_TOKEN_INDEX else 1
            self.seen[i] += n
        return self._forward(x, new_mask, positions)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    # ---------------------------------------------------------------- decode
    @torch.inference_mode()
    def step(self, tokens: Sequence[int], live: Sequence[bool]) -> torch.Tensor:
        """Append one token per live row (idle rows get a masked column); logits [B, V]."""
        col = self.mask.shape[1]
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(self.batch, 1)
        new_mask = torch.tensor(live, dtype=torch.bool, device=self.device).view(self.batch, 1)
        positions = torch.tensor(self.seen, dtype=torch.long, device=self.device).view(-1, 1)
        for i, is_live in enumerate(live):
            if is_live:
                self.fed[i].append(int(tokens[i]))
                self.cols[i].append(col)
                self.seen[i] += 1
        return self._forward(self.model.embed_tokens(ids), new_mask, positions)

    def _forward(
        self, embeds: torch.Tensor, new_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.model.llama(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        # Only the last position's logits are needed: [B, hidden] -> [B, V].
        return self.model.logits(out.last_hidden_state[:, -1]).float()


StopCheck = Callable[[list[int]], bool]


def generate_turn(
    batch: ChatBatch,
    sequences: Sequence[list[int] | None],
    params: SamplingParams,
    *,
    generators: Sequence[torch.Generator] | None = None,
    stop: StopCheck | None = None,
    context_limit: int | None = None,
    max_new_tokens: Sequence[int] | None = None,
) -> list[list[int]]:
    """Run one assistant turn for every row with a sequence; returns the generated ids.

    A row stops after emitting EOS (kept in its output, as the reference's generate returns
    it), when ``stop`` says so (the reference's keyword check), or at its token budget:
    ``min(max_new_tokens, context_limit - len(sequence) - 1)`` as the reference computes it.
    Rows given ``None`` do not generate.
    """
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = batch.extend(sequences)
        budgets = []
        for i, seq in enumerate(sequences):
            cap = params.max_new_tokens if max_new_tokens is None else max_new_tokens[i]
            if seq is not None and context_limit is not None:
                cap = min(cap, context_limit - len(seq) - 1)
            budgets.append(max(cap, 0) if seq is not None else 0)
        outputs: list[list[int]] = [[] for _ in sequences]
        live = [b > 0 for b in budgets]
        picks = choose_tokens(logits, params, generators, live) if any(live) else []
        t1 = time.perf_counter()
        batch.timings["prefill"] += t1 - t0
        while any(live):
            for i in range(len(live)):
                if not live[i]:
                    continue
                tok = picks[i]
                outputs[i].append(tok)
                stopped = not params.ignore_eos and (
                    tok == EOS_TOKEN_ID or (stop is not None and stop(outputs[i]))
                )
                if stopped or len(outputs[i]) >= budgets[i]:
                    live[i] = False
            if not any(live):
                break
            logits = batch.step([p if lv else 0 for p, lv in zip(picks, live, strict=True)], live)
            picks = choose_tokens(logits, params, generators, live)
        batch.timings["decode"] += time.perf_counter() - t1
    return outputs


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

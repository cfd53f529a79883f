"""Continuous batching of multi-turn conversations over one ``SlotDecoder``.

A ``Conversation`` is one study's chat: it gives the token sequence of its first turn, and after
each answer the sequence of the next turn (or ``None`` when it is done). The ``Scheduler`` keeps
up to ``slots`` conversations in the KV cache and drives them with one loop::

    collect   read the device state back (one copy every ``sync_every`` decode steps) and handle
              rows that stopped: keyword stops, end of turn, next turn or end of conversation
    admit     move waiting conversations into free slots and encode their images together
    prefill   feed what each starting turn adds to its slot (prefix reuse, see below)
    decode    up to ``sync_every`` decode steps for every decoding slot, all on the device

So a slot freed by a finished study takes the next waiting study between two decode steps, and
a study's later turns join the running batch as soon as its previous answer ends.

Turns are given as the row's *complete* token sequence, exactly what a full re-prefill would
feed (the reference re-renders and re-tokenizes the whole chat every turn, docs/model.md, "Prompt and chat template"). The slot
keeps the longest prefix that its cache already holds and feeds only the rest, so the chat
prefix, the 1024 image embeddings included, is computed once. Re-tokenized answers usually
match the generated ids; where they do not, the row is cut back at the first difference.

Samples of one study (self-consistency, ``model.consensus``) are conversations that share one
``pixels`` tensor: admitted together, their image is encoded once, and when their first turns
are the same ids the prompt is prefilled in one row and its KV prefix copied to the others;
each row then draws its own tokens from the shared logits with its own seed.

Stopping follows the reference: a row stops after EOS (kept in its output), when ``stop`` says
so (the reference's keyword check on the decoded text) or at its budget,
``min(max_new_tokens, context_limit - len(sequence) - 1)``. EOS and the budget are checked on
the device after every step; the keyword check runs on the host when the state is read back,
and a row that went on past it is cut back to the stop (its extra steps are never seen: they
sit past the row's position, and its draws are counted per token, see ``model.generate``).
"""

from __future__ import annotations

import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.chat import IMAGE_TOKEN_INDEX
from model.decoder import SlotDecoder, kv_bytes_per_token
from model.generate import (
    EOS_TOKEN_ID,
    MAX_NEW_TOKENS,
    RowSampling,
    SamplingParams,
    choose_tokens,
    common_prefix,
)
from model.modeling import CXRLLaVAModel

log = logging.getLogger(__name__)

StopCheck = Callable[[list[int]], bool]
GATHER_BYTES = 1 << 30  # most cached keys + values one follow-up prefill call copies per layer


@dataclass(frozen=True)
class Turn:
    """What a conversation asks next: its whole chat as ids, and how to decode the answer."""

    ids: list[int]
    params: SamplingParams


@dataclass
class StudyStats:
    """When a study passed each stage (``time.perf_counter`` seconds) and what it cost.

    ``encode``, ``prefill`` and ``decode`` are the wall time of the model calls the study took
    part in (shared with the studies in the same call). ``group`` numbers the admission: studies
    encoded and admitted together share it. ``peak_batch`` is the most studies that decoded in
    one step with this one, itself included.
    """

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    encode: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    group: int | None = None
    peak_batch: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    cut_by_capacity: bool = False

    def timings(self) -> dict[str, float]:
        """Seconds per stage, for ``ModelResult.timings``."""
        out = {"encode": self.encode, "prefill": self.prefill, "decode": self.decode}
        if self.admitted is not None:
            out["queued"] = self.admitted - self.submitted
        if self.first_token is not None:
            out["first_token"] = self.first_token - self.submitted
        end = self.finished if self.finished is not None else time.perf_counter()
        out["total"] = end - self.submitted
        return out


class Conversation(ABC):
    """One study's chat as the scheduler drives it.

    Attributes
    ----------
    pixels:
        The study's normalised image, float32 [1, S, S] (``model.preprocess.pixel_values``).
    seed:
        Seed of the study's draws when sampling (``model.generate``).
    stats:
        Filled in by the scheduler.
    """

    pixels: torch.Tensor
    seed: int
    stats: StudyStats

    @abstractmethod
    def start(self) -> Turn:
        """The first turn (its ids contain one ``IMAGE_TOKEN_INDEX``)."""

    @abstractmethod
    def advance(self, generated: list[int]) -> Turn | None:
        """Take the ids generated for the last turn; return the next turn, or None when done."""


@dataclass
class _Slot:
    """Host-side state of one occupied slot."""

    conv: Conversation
    image: torch.Tensor | None  # [N, hidden] projected image embeddings (once encoded)
    fed: list[int] = field(default_factory=list)  # ids whose keys are in the cache, in order
    pending: Turn | None = None  # a turn waiting for its prefill
    turn: Turn | None = None  # the turn being decoded
    budget: int = 0
    prompt_end: int = 0  # the row's position after the turn's prefill
    outputs: list[int] = field(default_factory=list)  # this turn's ids read back so far
    decoding: bool = False
    generated: int = 0  # ids generated in earlier turns (the draw counter's base)


@dataclass
class SchedulerStats:
    """Totals over the scheduler's life, for benchmarks."""

    decode_steps: int = 0
    decode_time: float = 0.0
    row_steps: int = 0  # sum over steps of the rows decoding
    context_sum: int = 0  # sum over steps and decoding rows of the attended positions (bound)
    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_pairs: int = 0  # (query, key) pairs attended in prefill, for FLOP counts
    prefill_time: float = 0.0
    encode_time: float = 0.0
    images: int = 0
    syncs: int = 0


class Scheduler:
    """Continuous batching of ``Conversation``s; single-threaded, driven by ``iterate``.

    Parameters
    ----------
    model:
        The loaded model.
    slots, capacity:
        Studies decoded together, and positions per study (``SlotDecoder``).
    context_limit:
        The reference's context for the per-turn budget (``config.max_context_length``).
    stop:
        The reference's keyword check on a turn's ids so far.
    sync_every:
        Decode steps between two reads of the device state. Larger means fewer host
        synchronisations; a row that stops waits up to this many steps for its next turn.
    reuse_prefix:
        ``False`` re-feeds every turn's whole chat (what the reference does), for comparisons.
    prefill_tokens:
        Most (padded) positions per prefill call; more rows wait for the next call.
    encode_batch:
        Most images per vision-tower call.
    """

    def __init__(
        self,
        model: CXRLLaVAModel,
        *,
        slots: int,
        capacity: int,
        context_limit: int | None = None,
        stop: StopCheck | None = None,
        sync_every: int = 8,
        reuse_prefix: bool = True,
        prefill_tokens: int = 8192,
        encode_batch: int = 8,
        cuda_graphs: bool | None = None,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, found {sync_every}.")
        self.model = model
        self.decoder = SlotDecoder(model, slots, capacity, cuda_graphs=cuda_graphs)
        self.context_limit = context_limit
        self.stop = stop
        self.sync_every = sync_every
        self.reuse_prefix = reuse_prefix
        self.prefill_tokens = prefill_tokens
        self.encode_batch = encode_batch
        self.num_image_tokens = model.config.num_image_tokens
        self.device = model.device
        dev = self.device
        self.sampling = RowSampling(slots, dev)
        self.live = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.count = torch.zeros(slots, dtype=torch.long, device=dev)
        self.budget = torch.zeros(slots, dtype=torch.long, device=dev)
        self.ignore_eos = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.base = torch.zeros(slots, dtype=torch.long, device=dev)
        self.out = torch.zeros(slots, MAX_NEW_TOKENS, dtype=torch.long, device=dev)
        self._all = torch.arange(slots, device=dev)
        self.slots: list[_Slot | None] = [None] * slots
        self._position_bound = [0] * slots  # host upper bound of each row's device position
        self.waiting: deque[Conversation] = deque()
        self.finished: list[Conversation] = []
        self.failed: list[tuple[Conversation, BaseException]] = []
        self.stats = SchedulerStats()
        self._groups = itertools.count()
        self._gather_row_bytes = kv_bytes_per_token(model) * capacity // len(self.decoder.layers)

    # ------------------------------------------------------------------ public
    @property
    def capacity(self) -> int:
        return self.decoder.capacity

    def add(self, conversation: Conversation) -> None:
        """Queue a conversation; it starts when a slot is free."""
        if not hasattr(conversation, "stats"):
            conversation.stats = StudyStats()
        self.waiting.append(conversation)

    @property
    def busy(self) -> bool:
        """Whether any conversation is waiting or running."""
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def drain(self) -> tuple[list[Conversation], list[tuple[Conversation, BaseException]]]:
        """Conversations finished and failed since the last call."""
        done, failed = self.finished, self.failed
        self.finished, self.failed = [], []
        return done, failed

    def run(self) -> None:
        """Iterate until every queued conversation has finished or failed."""
        while self.busy:
            self.iterate()

    def iterate(self) -> None:
        """One round: collect, admit, prefill, decode (see the module docstring).

        A failure of the model itself (say, out of memory) fails every running conversation,
        frees the slots and is raised; the scheduler can be used again afterwards.
        """
        try:
            with torch.inference_mode():
                self._collect()
                self._admit()
                self._prefill()
                self._decode()
        except Exception as exc:
            self.abort(exc)
            raise

    def abort(self, exc: BaseException) -> None:
        """Fail every running conversation with ``exc`` and free its slot."""
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self.failed.append((slot.conv, exc))
                self._free(i)

    # ------------------------------------------------------------------ collect
    def _collect(self) -> None:
        rows = [i for i, s in enumerate(self.slots) if s is not None and s.decoding]
        if not rows:
            return
        # One device-to-host copy for the whole state.
        state = torch.cat(
            [
                self.live[:, None].long(),
                self.count[:, None],
                self.decoder.positions[:, None],
                self.out,
            ],
            dim=1,
        ).cpu()
        self.stats.syncs += 1
        state = state.tolist()
        for i in rows:
            slot = self.slots[i]
            live, count = bool(state[i][0]), state[i][1]
            new = state[i][3 + len(slot.outputs) : 3 + count]
            stopped = False
            for tok in new:
                slot.outputs.append(tok)
                if (
                    not slot.turn.params.ignore_eos
                    and self.stop is not None
                    and tok != EOS_TOKEN_ID
                    and self.stop(slot.outputs)
                ):
                    stopped = True
                    break
            if stopped and (live or len(slot.outputs) < count):
                # The device went on past the keyword stop: cut the row back to it.
                n = len(slot.outputs)
                self.live[i] = False
                self.count[i] = n
                self.decoder.positions[i] = slot.prompt_end + n - 1
                self._position_bound[i] = slot.prompt_end + n - 1
            if stopped or not live:
                self._end_turn(i)
            else:
                self._position_bound[i] = state[i][2]

    def _end_turn(self, i: int) -> None:
        slot = self.slots[i]
        slot.decoding = False
        if slot.outputs:
            slot.fed = slot.turn.ids + slot.outputs[:-1]
        slot.generated += len(slot.outputs)
        slot.conv.stats.generated_tokens += len(slot.outputs)
        self._advance(i, list(slot.outputs))

    def _advance(self, i: int, generated: list[int]) -> None:
        slot = self.slots[i]
        try:
            turn = slot.conv.advance(generated)
        except Exception as exc:
            log.exception("conversation failed after a turn")
            self.failed.append((slot.conv, exc))
            self._free(i)
            return
        if turn is None:
            slot.conv.stats.finished = time.perf_counter()
            self.finished.append(slot.conv)
            self._free(i)
        else:
            slot.pending = turn

    def _free(self, i: int) -> None:
        self.slots[i] = None
        self.live[i] = False
        self.decoder.positions[i] = 0
        self.decoder.tokens[i] = 0
        self._position_bound[i] = 0

    # ------------------------------------------------------------------ admit
    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        starting: list[tuple[Conversation, Turn]] = []
        while free and self.waiting and len(starting) < len(free):
            conv = self.waiting.popleft()
            try:
                starting.append((conv, conv.start()))
            except Exception as exc:
                log.exception("conversation failed to start")
                self.failed.append((conv, exc))
        if not starting:
            return
        group = next(self._groups)
        now = time.perf_counter()
        placed: list[int] = []
        for conv, turn in starting:
            i = free.pop(0)
            conv.stats.admitted = now
            conv.stats.group = group
            self.slots[i] = _Slot(conv=conv, image=None, pending=turn)
            placed.append(i)
        # Placed before encoding, so that a failure of the vision tower fails them via abort().
        # Samples of one study share their pixels tensor: one encoding serves them all.
        shared: dict[int, list[int]] = {}
        for i in placed:
            shared.setdefault(id(self.slots[i].conv.pixels), []).append(i)
        owners = [rows[0] for rows in shared.values()]
        for start in range(0, len(owners), self.encode_batch):
            chunk = owners[start : start + self.encode_batch]
            t0 = time.perf_counter()
            pixels = torch.stack([self.slots[i].conv.pixels for i in chunk])
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            images = self.model.encode_images(pixels.to(self.device, non_blocking=True))
            _sync(self.device)
            elapsed = time.perf_counter() - t0
            self.stats.encode_time += elapsed
            self.stats.images += len(chunk)
            for i, image in zip(chunk, images, strict=True):
                for j in shared[id(self.slots[i].conv.pixels)]:
                    self.slots[j].image = image
                    self.slots[j].conv.stats.encode += elapsed

    # ------------------------------------------------------------------ prefill
    def _columns(self, ids: list[int], k: int) -> int:
        """Cache column of item ``k`` of ``ids`` (an image sentinel spans N columns)."""
        return k + (self.num_image_tokens - 1) * ids[:k].count(IMAGE_TOKEN_INDEX)

    def _prefill(self) -> None:
        jobs: list[tuple[int, int, torch.Tensor]] = []  # (slot, start column, embeddings)
        for i, slot in enumerate(self.slots):
            if slot is None or slot.pending is None:
                continue
            turn, slot.pending = slot.pending, None
            try:
                job = self._start_turn(i, slot, turn)
            except Exception as exc:
                log.exception("turn could not start")
                self.failed.append((slot.conv, exc))
                self._free(i)
                continue
            if job is None:  # nothing to generate: the turn ends empty
                slot.turn = turn
                slot.outputs = []
                self._end_turn(i)
                continue
            jobs.append(job)
        # First turns of samples of one study with the same ids are prefilled once: the other
        # rows copy that row's KV prefix and draw from its logits (``_prefill_chunk``).
        followers: dict[int, list[int]] = {}
        leaders: dict[tuple[int, tuple[int, ...]], int] = {}
        kept = []
        for job in jobs:
            slot = self.slots[job[0]]
            if job[1] == 0 and self.reuse_prefix:
                key = (id(slot.conv.pixels), tuple(slot.fed))
                if key in leaders:
                    followers.setdefault(leaders[key], []).append(job[0])
                    continue
                leaders[key] = job[0]
            kept.append(job)
        jobs = kept
        # First turns (column 0) and follow-ups run as separate calls: the former can use
        # plain causal attention on the fresh keys.
        for fresh in (True, False):
            group = [j for j in jobs if (j[1] == 0) == fresh]
            chunk: list[tuple[int, int, torch.Tensor]] = []
            for job in group:
                width = max([j[2].shape[0] for j in chunk] + [job[2].shape[0]])
                too_wide = width * (len(chunk) + 1) > self.prefill_tokens
                # Follow-ups gather their rows' cached keys, one layer at a time.
                too_many = not fresh and (len(chunk) + 1) * self._gather_row_bytes > GATHER_BYTES
                if chunk and (too_wide or too_many):
                    self._prefill_chunk(chunk, followers)
                    chunk = []
                chunk.append(job)
            if chunk:
                self._prefill_chunk(chunk, followers)

    def _start_turn(self, i: int, slot: _Slot, turn: Turn) -> tuple[int, int, torch.Tensor] | None:
        """Set the slot up for ``turn``; return its prefill job, or None if it has no budget."""
        seq = list(turn.ids)
        if not seq:
            raise ValueError("a turn needs a non-empty token sequence.")
        budget = turn.params.max_new_tokens
        if self.context_limit is not None:
            budget = min(budget, self.context_limit - len(seq) - 1)
        if budget <= 0:
            return None
        end = self._columns(seq, len(seq))
        if end + 1 > self.capacity:
            raise ValueError(
                f"the chat needs {end} positions but a slot holds {self.capacity - 1}; "
                "raise the capacity (ReportServer/ReportEngine capacity=...)."
            )
        if end + budget > self.capacity:
            slot.conv.stats.cut_by_capacity = True
            log.warning(
                "answer budget cut from %d to %d by the slot capacity", budget, self.capacity - end
            )
            budget = self.capacity - end
        k = common_prefix(slot.fed, seq) if self.reuse_prefix else 0
        k = min(k, len(seq) - 1)  # feed at least one id: logits come from the last one
        start = self._columns(seq, k)
        embeds = self._embed(slot, seq, k)
        slot.turn = turn
        slot.fed = seq
        slot.budget = budget
        slot.prompt_end = end
        slot.outputs = []
        return (i, start, embeds)

    def _embed(self, slot: _Slot, seq: list[int], k: int) -> torch.Tensor:
        """Embeddings of ``seq[k:]`` with the image in place of its sentinel."""
        parts, run = [], []
        for tok in seq[k:]:
            if tok == IMAGE_TOKEN_INDEX:
                if seq.count(IMAGE_TOKEN_INDEX) > 1:
                    raise ValueError("a chat may hold one <image>; found more sentinels.")
                if run:
                    parts.append(self._token_embeds(run))
                    run = []
                parts.append(slot.image.to(self.model.dtype))
            else:
                run.append(tok)
        if run:
            parts.append(self._token_embeds(run))
        return torch.cat(parts)

    def _token_embeds(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    def _prefill_chunk(
        self,
        chunk: list[tuple[int, int, torch.Tensor]],
        followers: dict[int, list[int]] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        slots = [j[0] for j in chunk]
        logits = self.decoder.prefill(slots, [j[1] for j in chunk], [j[2] for j in chunk])
        copies = [(k, f) for k, s in enumerate(slots) for f in (followers or {}).get(s, [])]
        if copies:  # rows that share a leader's prompt: its keys, values and logits
            for k, f in copies:
                n = self.slots[slots[k]].prompt_end
                for keys, values in zip(self.decoder.k, self.decoder.v, strict=True):
                    keys[f, :, :n] = keys[slots[k], :, :n]
                    values[f, :, :n] = values[slots[k], :, :n]
            logits = torch.cat([logits, logits[[k for k, _ in copies]]])
            slots = slots + [f for _, f in copies]
            chunk = chunk + [(f, 0, chunk[k][2][:0]) for k, f in copies]
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        rows = [self.slots[i] for i in slots]
        self.decoder.positions[idx] = _tensor([s.prompt_end for s in rows], self.device)
        self.budget[idx] = _tensor([s.budget for s in rows], self.device)
        self.base[idx] = _tensor([s.generated for s in rows], self.device)
        self.ignore_eos[idx] = _tensor([s.turn.params.ignore_eos for s in rows], self.device)
        self.count[idx] = 0
        self.live[idx] = True
        self.sampling.set_rows(idx, [s.turn.params for s in rows], [s.conv.seed for s in rows])
        any_sampled = any(not s.turn.params.greedy for s in rows)
        picks = choose_tokens(logits, self.sampling, idx, self.base[idx], any_sampled)
        self._record(idx, picks)
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        now = time.perf_counter()
        fed = sum(int(j[2].shape[0]) for j in chunk)
        for _, start, embeds in chunk:
            n = int(embeds.shape[0])
            self.stats.prefill_pairs += n * start + n * (n + 1) // 2
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += fed
        self.stats.prefill_time += elapsed
        for (i, _, embeds), slot in zip(chunk, rows, strict=True):
            slot.decoding = True
            slot.conv.stats.prefill += elapsed
            slot.conv.stats.prefill_tokens += int(embeds.shape[0])
            if slot.conv.stats.first_token is None:
                slot.conv.stats.first_token = now
            self._position_bound[i] = slot.prompt_end

    # ------------------------------------------------------------------ decode
    def _record(self, idx: torch.Tensor, picks: torch.Tensor) -> None:
        """Append ``picks`` to the live rows ``idx``, then stop rows at EOS or their budget."""
        live = self.live[idx]
        count = self.count[idx]
        at = count.clamp(max=MAX_NEW_TOKENS - 1)
        self.out[idx, at] = torch.where(live, picks, self.out[idx, at])
        count = count + live
        eos = (picks == EOS_TOKEN_ID) & ~self.ignore_eos[idx]
        still = live & ~(eos | (count >= self.budget[idx]))
        self.count[idx] = count
        self.live[idx] = still
        tokens = self.decoder.tokens
        tokens[idx] = torch.where(still, picks, tokens[idx])

    def _decode(self) -> None:
        rows = [i for i, s in enumerate(self.slots) if s is not None and s.decoding]
        if not rows:
            return
        # Each step adds at most one id per row, so no row needs more than this many steps.
        remaining = max(self.slots[i].budget - max(len(self.slots[i].outputs), 1) for i in rows)
        steps = min(self.sync_every, remaining)
        if steps <= 0:
            return
        width = max(self._position_bound) + steps
        any_sampled = any(not self.slots[i].turn.params.greedy for i in rows)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = self.decoder.decode(width)
            self.decoder.positions += self.live  # the fed token now occupies its column
            counter = self.base + self.count
            picks = choose_tokens(logits, self.sampling, self._all, counter, any_sampled)
            self._record(self._all, picks)
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        self.stats.decode_steps += steps
        self.stats.decode_time += elapsed
        self.stats.row_steps += steps * len(rows)
        for i in rows:
            slot = self.slots[i]
            self.stats.context_sum += sum(
                min(self._position_bound[i] + j, slot.prompt_end + slot.budget) + 1
                for j in range(steps)
            )
            self._position_bound[i] = min(
                self._position_bound[i] + steps, slot.prompt_end + slot.budget - 1
            )
            slot.conv.stats.decode += elapsed
            slot.conv.stats.peak_batch = max(slot.conv.stats.peak_batch, len(rows))


def _tensor(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""``ReportEngine``: chest radiographs in, draft report + differential + recommendation out.

A study runs the reference's multi-turn use of the model (docs/model.md, "Prompt and chat template"): the report prompt with
the image, then the differential question, then the recommendation question, each answer
appended to the same chat (``StudyConversation``). What we add to the reference:

* the image is encoded once per study, and the chat prefix stays in the KV cache between turns;
  only the new turn's tokens are fed (``model.scheduler``);
* studies are continuously batched over a static KV cache (``model.decoder``); greedy output is
  the same alone or batched;
* the report is labelled into findings with ``model.labeler`` (in process), optionally
  followed by yes/no confirmation turns; patients under 18 get an age-aware report prompt.

``ReportEngine.generate`` runs a list of studies to completion; ``model.serving.ReportServer``
serves a stream of them from a thread.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.chat import Message, render_llama2, tokenize_with_image
from model.consensus import vote
from model.contracts import FINDINGS, ModelResult, StudyContext
from model.generate import MAX_NEW_TOKENS, SamplingParams, new_seed
from model.labeler import label_report
from model.loader import Quantization, choose_device, inspect_checkpoint, load_model
from model.modeling import CXRLLaVAModel
from model.preprocess import pixel_values
from model.prompts import PromptConfig
from model.scheduler import Conversation, Scheduler, StudyStats, Turn
from model.tokenizer import LlamaTokenizer

__all__ = ["ReportEngine", "StudyContext", "StudyConversation", "default_capacity"]

STATES = {1: "present", 0: "absent", -1: "uncertain", None: "not_mentioned"}
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
PATHOLOGIES = tuple(n for n in FINDINGS if n != "no_finding")
PROMPT_ALLOWANCE = 192  # ids of prompt text a slot keeps room for, besides the follow-ups


def default_capacity(config: Any, max_new_tokens: int = MAX_NEW_TOKENS, turns: int = 3) -> int:
    """Positions a slot needs for a ``turns``-turn study at ``max_new_tokens`` per answer.

    The image, ``turns`` answers, and room for the prompt text: the system and report prompts
    take ~100 ids (~140 with the paediatric caution), a follow-up question ~20. Capped by the
    model's context.
    """
    llama_max = int(config.llama.get("max_position_embeddings", 4096))
    need = config.num_image_tokens + turns * max_new_tokens + PROMPT_ALLOWANCE + 32 * turns
    return min(need, llama_max)


class ReportEngine:
    """A loaded CXR-LLaVA v2 model with its tokenizer, prompts and labeler.

    Parameters
    ----------
    reuse_prefix:
        Keep the chat prefix in the KV cache between turns (default). ``False`` re-prefills the
        whole chat every turn, as the reference does; the answers are the same, only slower.
    max_batch_size:
        Studies decoded together (KV-cache slots) by ``generate``; further studies take a slot
        as soon as one is free.
    quantization:
        The weight quantization the model was loaded with (None, "int8" or "int4"); recorded
        so that results say which weights produced them.
    """

    def __init__(
        self,
        model: CXRLLaVAModel,
        tokenizer: LlamaTokenizer,
        *,
        model_id: str,
        model_hash: str,
        prompts: PromptConfig | None = None,
        max_batch_size: int = 16,
        reuse_prefix: bool = True,
        quantization: Quantization = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.model_id = model_id
        self.model_hash = model_hash
        self.prompts = prompts or PromptConfig()
        self.max_batch_size = max_batch_size
        self.reuse_prefix = reuse_prefix
        self.quantization = quantization
        self._last_scheduler: Scheduler | None = None  # reused by generate (CUDA graphs, cache)
        self._closer_ids: frozenset[int] | None = None

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        device: str | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        quantize: Quantization = None,
        free_bytes: int | None = None,
        **options: Any,
    ) -> ReportEngine:
        """Load a checkpoint directory or hub id; ``options`` go to the constructor.

        ``quantize`` ("int8", "int4" or None) loads the LLaMA layers with weight-only
        quantization (``model.quantize``), for GPUs with 16-24 GB and CPU-only sites;
        ``model_hash`` then names the quantized weights, not the published ones. ``dtype``
        may be a setting's name ("auto", "bfloat16", "float32"); ``free_bytes`` overrides the
        device's measured free memory for the fit check (``model.loader.check_fits``).
        """
        checkpoint = inspect_checkpoint(model)
        tokenizer = LlamaTokenizer.from_dir(checkpoint.directory)
        net = load_model(
            checkpoint,
            choose_device(device),
            dtype,
            attn_implementation,
            quantize=quantize,
            free_bytes=free_bytes,
        )
        if tokenizer.vocab_size > checkpoint.config.vocab_size:
            raise ValueError(
                f"tokenizer.model has {tokenizer.vocab_size} pieces but llama.vocab_size is "
                f"{checkpoint.config.vocab_size}; they must come from the same checkpoint."
            )
        return cls(
            net,
            tokenizer,
            model_id=checkpoint.model_id,
            model_hash=_quantized_hash(checkpoint.model_hash, quantize),
            quantization=quantize,
            **options,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        images: Sequence[np.ndarray],
        contexts: Sequence[StudyContext | None] | None = None,
        *,
        temperature: float = 0.2,
        top_p: float = 0.8,
        top_k: int = 50,
        max_new_tokens: int = 512,
        seed: int | None = None,
        ignore_eos: bool = False,
        report_only: bool = False,
        samples: int = 1,
        min_agreement: float = 0.0,
    ) -> list[ModelResult]:
        """Draft a report for each 8-bit grayscale image (uint8 HxW, any size).

        ``temperature`` 0 is greedy. ``seed`` makes sampling reproducible (study i of the
        request draws from ``seed + i``, whatever else runs with it). ``ignore_eos`` forces
        ``max_new_tokens`` per turn (benchmarks). ``report_only`` skips the differential and
        recommendation turns (left empty), for evaluations that score only the report.
        ``samples`` > 1 draws that many reports per study in the same batch (sharing the image
        encoding and the prompt's prefill) and votes them (``model.consensus``); sample j of
        study i draws from ``seed + i * samples + j``.
        """
        images = list(images)
        contexts = list(contexts) if contexts is not None else [None] * len(images)
        if len(contexts) != len(images):
            raise ValueError(f"{len(images)} images but {len(contexts)} contexts.")
        if not images:
            return []
        params = SamplingParams(temperature, top_p, top_k, max_new_tokens, ignore_eos)
        if samples == 1:
            studies = [
                [
                    self.conversation(
                        image,
                        context,
                        params,
                        seed=None if seed is None else seed + i,
                        report_only=report_only,
                    )
                ]
                for i, (image, context) in enumerate(zip(images, contexts, strict=True))
            ]
        else:
            studies = [
                self.samples(
                    image,
                    context,
                    params,
                    samples,
                    seed=None if seed is None else seed + i * samples,
                    report_only=report_only,
                )
                for i, (image, context) in enumerate(zip(images, contexts, strict=True))
            ]
        rows = [conv for group in studies for conv in group]
        scheduler = self._scheduler_for(
            min(self.max_batch_size, len(rows)), max_new_tokens, 1 if report_only else 3
        )
        for conv in rows:
            scheduler.add(conv)
        scheduler.run()
        _, failed = scheduler.drain()
        if failed:
            raise failed[0][1]
        return [vote([c.result() for c in group], min_agreement) for group in studies]

    def conversation(
        self,
        image: np.ndarray,
        context: StudyContext | None = None,
        params: SamplingParams | None = None,
        *,
        seed: int | None = None,
        report_only: bool = False,
    ) -> StudyConversation:
        """One study, ready for a ``Scheduler``; the image is preprocessed here, in the caller's
        thread (raises ``UnsupportedImageError`` for images the model does not take)."""
        cfg = self.config
        pixels = pixel_values(image, cfg.image_mean, cfg.image_std, cfg.image_size)
        return StudyConversation(
            self, torch.from_numpy(pixels), context, params or SamplingParams(), seed, report_only
        )

    def samples(
        self,
        image: np.ndarray,
        context: StudyContext | None,
        params: SamplingParams,
        k: int,
        *,
        seed: int | None = None,
        report_only: bool = False,
    ) -> list[StudyConversation]:
        """``k`` conversations of one study that share one preprocessed image (so the
        scheduler encodes it once and shares the prompt's prefill); seeds ``seed + j``."""
        first = self.conversation(image, context, params, seed=seed, report_only=report_only)
        return [first] + [
            StudyConversation(self, first.pixels, context, params, first.seed + j, report_only)
            for j in range(1, k)
        ]

    def _scheduler_for(self, slots: int, max_new_tokens: int, turns: int) -> Scheduler:
        """The scheduler of the previous call when it has the same shape (its KV cache and, on
        CUDA, its captured graphs are reused), else a new one that replaces it."""
        capacity = self._capacity(max_new_tokens, turns)
        last = self._last_scheduler
        if last is None or last.busy or last.decoder.slots != slots or last.capacity < capacity:
            self._last_scheduler = None  # free the old cache before allocating the new one
            last = self._last_scheduler = self.scheduler(slots, capacity=capacity)
        last.reuse_prefix = self.reuse_prefix
        return last

    def _capacity(self, max_new_tokens: int, turns: int) -> int:
        extra = 0
        if self.prompts.confirm_findings:
            extra = len(PATHOLOGIES) * (self.prompts.confirmation_max_new_tokens + 48)
        return min(
            default_capacity(self.config, max_new_tokens, turns) + extra,
            int(self.config.llama.get("max_position_embeddings", 4096)),
        )

    def scheduler(
        self,
        slots: int,
        *,
        capacity: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        turns: int = 3,
        **options: Any,
    ) -> Scheduler:
        """A ``Scheduler`` over this engine's model with ``slots`` KV-cache rows.

        ``capacity`` defaults to what ``turns`` answers of ``max_new_tokens`` need (plus the
        confirmation turns when they are on); ``options`` go to ``Scheduler``.
        """
        if capacity is None:
            capacity = self._capacity(max_new_tokens, turns)
        return Scheduler(
            self.model,
            slots=slots,
            capacity=capacity,
            context_limit=self.config.max_context_length,
            stop=self._keyword_stop,
            reuse_prefix=self.reuse_prefix,
            **options,
        )

    def pixel_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images -> float32 [B, 1, S, S] normalised pixels (bit-exact with the reference)."""
        cfg = self.config
        arrays = [pixel_values(im, cfg.image_mean, cfg.image_std, cfg.image_size) for im in images]
        return torch.from_numpy(np.stack(arrays))

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Projected image embeddings [B, N, hidden], computed once per study."""
        with torch.inference_mode():
            return self.model.encode_images(self.pixel_batch(images))

    def _keyword_stop(self, generated: list[int]) -> bool:
        """The reference's ``KeywordsStoppingCriteria``: "</s>" in the last three tokens' text.

        Decoding costs ~20 µs a call and runs for every generated token, so windows without a
        token whose piece contains ">" (the keyword's last character; byte pieces "<0xNN>" and
        unknown ids count as containing it) are answered without decoding: exact, and most
        windows.
        """
        window = generated[-3:]
        closers = self._closers()
        n = self.tokenizer.vocab_size
        if not any(t >= n or t < 0 or t in closers for t in window):
            return False
        return self.tokenizer.eos_token in self.tokenizer.decode(window)

    def _closers(self) -> frozenset[int]:
        """Ids whose piece contains ">", computed once per tokenizer."""
        if self._closer_ids is None:
            tok = self.tokenizer
            self._closer_ids = frozenset(
                i for i in range(tok.vocab_size) if ">" in tok.id_to_token(i)
            )
        return self._closer_ids


class StudyConversation(Conversation):
    """One study's chat: report, differential, recommendation, then optional confirmations.

    The confirmations (``PromptConfig.confirm_findings``) ask yes/no for each finding the
    report leaves uncertain or unmentioned. They come after the recommendation turn, so the
    three main answers are the same with or without them. A clear "yes"/"no" replaces the
    report's label and is recorded as ``finding_sources[name] = "confirmation"``.
    """

    def __init__(
        self,
        engine: ReportEngine,
        pixels: torch.Tensor,
        context: StudyContext | None,
        params: SamplingParams,
        seed: int | None = None,
        report_only: bool = False,
    ) -> None:
        self.engine = engine
        self.pixels = pixels
        self.seed = new_seed() if seed is None else seed
        self.stats = StudyStats()
        self.params = params
        self.report_only = report_only
        p = engine.prompts
        first, self.report_variant = p.report_message(context.age_years if context else None)
        self.chat = [Message("system", p.system), Message("user", first)]
        self.stage = "report"
        self.answers = {"report": "", "differential": "", "recommendation": ""}
        self.findings: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self.pending: list[str] = []
        self.asking: str | None = None

    def start(self) -> Turn:
        return self._turn(self.params)

    def advance(self, generated: list[int]) -> Turn | None:
        text = self.engine.tokenizer.stream_decode(generated)
        p = self.engine.prompts
        if self.stage == "confirm":
            self._read_confirmation(text)
            return self._ask_next(text)
        self.answers[self.stage] = text
        if self.stage == "report":
            states = {k: STATES[v] for k, v in label_report(text.strip()).items()}
            self.findings = states
            self.sources = dict.fromkeys(states, "report")
        following = {"report": ("differential", p.differential)}
        following["differential"] = ("recommendation", p.recommendation)
        if self.stage in following and not self.report_only:
            self.stage, question = following[self.stage]
            self.chat += [Message("assistant", text), Message("user", question)]
            return self._turn(self.params)
        if p.confirm_findings:
            self.pending = [
                n for n in PATHOLOGIES if self.findings.get(n) in ("uncertain", "not_mentioned")
            ]
        return self._ask_next(text)

    def _ask_next(self, last_answer: str) -> Turn | None:
        if not self.pending:
            self.stage = "done"
            return None
        p = self.engine.prompts
        self.asking = self.pending.pop(0)
        self.stage = "confirm"
        question = p.confirmation_question(self.asking)
        self.chat += [Message("assistant", last_answer), Message("user", question)]
        short = SamplingParams(
            self.params.temperature,
            self.params.top_p,
            self.params.top_k,
            p.confirmation_max_new_tokens,
        )
        return self._turn(short)

    def _read_confirmation(self, reply: str) -> None:
        match = _YES_NO.match(reply)
        if not match or self.asking is None:
            return
        name = self.asking
        self.findings[name] = "present" if match.group(1).lower() == "yes" else "absent"
        self.sources[name] = "confirmation"
        if self.findings[name] == "present" and self.findings.get("no_finding") == "present":
            self.findings["no_finding"] = "not_mentioned"
            self.sources["no_finding"] = "confirmation"

    def _turn(self, params: SamplingParams) -> Turn:
        tok = self.engine.tokenizer
        ids = tokenize_with_image(render_llama2(self.chat, tok.bos_token, tok.eos_token), tok)
        return Turn(ids, params)

    def result(self) -> ModelResult:
        """The study's ``ModelResult`` (call once the scheduler has finished it)."""
        variants = self.engine.prompts.variants()
        if self.report_only:
            variants |= {"differential": "skipped", "recommendation": "skipped"}
        return ModelResult(
            report=self.answers["report"].strip(),
            differential=self.answers["differential"].strip(),
            recommendation=self.answers["recommendation"].strip(),
            findings=self.findings,
            finding_sources=self.sources,
            prompts={"report": self.report_variant, **variants},
            model_id=self.engine.model_id,
            model_hash=self.engine.model_hash,
            timings=self.stats.timings(),
        )


def _quantized_hash(model_hash: str, quantize: Quantization) -> str:
    """The published weights' hash, or a hash naming their quantized form."""
    if quantize is None:
        return model_hash
    return hashlib.sha256(f"{model_hash}:{quantize}".encode()).hexdigest()

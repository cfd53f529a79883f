"""``ReportEngine``: chest radiographs in, draft report + differential + recommendation out.

One call runs a batch of studies through the reference's multi-turn use of the model (spec
§2.2): the report prompt with the image, then the differential question, then the
recommendation question, each answer appended to the same chat. What we add to the reference:

* the image is encoded once per study, and the chat prefix stays in the KV cache between turns
  (``model.generate.ChatBatch``); only the new turn's tokens are fed;
* studies are batched (left padding, per-row positions), greedy output is the same alone or
  batched;
* the report is labelled into findings with ``model.labeler`` (in process), optionally
  followed by yes/no confirmation turns; patients under 18 get an age-aware report prompt.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from model.chat import Message, render_llama2, tokenize_with_image
from model.contracts import FINDINGS, ModelResult, StudyContext
from model.generate import ChatBatch, SamplingParams, generate_turn, make_generators
from model.labeler import label_report
from model.loader import choose_device, inspect_checkpoint, load_model
from model.modeling import CXRLLaVAModel
from model.preprocess import pixel_values
from model.prompts import PromptConfig
from model.tokenizer import LlamaTokenizer

STATES = {1: "present", 0: "absent", -1: "uncertain", None: "not_mentioned"}
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


class ReportEngine:
    """A loaded CXR-LLaVA v2 model with its tokenizer, prompts and labeler.

    Parameters
    ----------
    reuse_prefix:
        Keep the chat prefix in the KV cache between turns (default). ``False`` re-prefills the
        whole chat every turn, as the reference does; the answers are the same, only slower.
    max_batch_size:
        Studies run together in one batch; longer requests are split.
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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.model_id = model_id
        self.model_hash = model_hash
        self.prompts = prompts or PromptConfig()
        self.max_batch_size = max_batch_size
        self.reuse_prefix = reuse_prefix

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        device: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        **options: Any,
    ) -> ReportEngine:
        """Load a checkpoint directory or hub id; ``options`` go to the constructor."""
        checkpoint = inspect_checkpoint(model)
        tokenizer = LlamaTokenizer.from_dir(checkpoint.directory)
        net = load_model(checkpoint, choose_device(device), dtype, attn_implementation)
        if tokenizer.vocab_size > checkpoint.config.vocab_size:
            raise ValueError(
                f"tokenizer.model has {tokenizer.vocab_size} pieces but llama.vocab_size is "
                f"{checkpoint.config.vocab_size}; they must come from the same checkpoint."
            )
        return cls(
            net,
            tokenizer,
            model_id=checkpoint.model_id,
            model_hash=checkpoint.model_hash,
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
    ) -> list[ModelResult]:
        """Draft a report for each 8-bit grayscale image (uint8 HxW, any size).

        ``temperature`` 0 is greedy. ``seed`` makes sampling reproducible (row i of the request
        draws from ``seed + i``). ``ignore_eos`` forces ``max_new_tokens`` per turn (benchmarks).
        ``report_only`` skips the differential and recommendation turns (left empty), for
        evaluations that score only the report.
        """
        images = list(images)
        contexts = list(contexts) if contexts is not None else [None] * len(images)
        if len(contexts) != len(images):
            raise ValueError(f"{len(images)} images but {len(contexts)} contexts.")
        params = SamplingParams(temperature, top_p, top_k, max_new_tokens, ignore_eos)
        results: list[ModelResult] = []
        for start in range(0, len(images), self.max_batch_size):
            stop = start + self.max_batch_size
            chunk_seed = None if seed is None else seed + start
            results += self._run(
                images[start:stop], contexts[start:stop], params, chunk_seed, report_only
            )
        return results

    def pixel_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images -> float32 [B, 1, S, S] normalised pixels (bit-exact with the reference)."""
        cfg = self.config
        arrays = [pixel_values(im, cfg.image_mean, cfg.image_std, cfg.image_size) for im in images]
        return torch.from_numpy(np.stack(arrays))

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Projected image embeddings [B, N, hidden], computed once per study."""
        with torch.inference_mode():
            return self.model.encode_images(self.pixel_batch(images))

    # ------------------------------------------------------------------ conversation
    def _run(
        self,
        images: list[np.ndarray],
        contexts: list[StudyContext | None],
        params: SamplingParams,
        seed: int | None,
        report_only: bool = False,
    ) -> list[ModelResult]:
        t0 = time.perf_counter()
        features = self.encode(images)
        _sync(self.device)
        t_encode = time.perf_counter() - t0

        p = self.prompts
        tok = self.tokenizer
        batch = ChatBatch(self.model, [[f] for f in features], reuse_prefix=self.reuse_prefix)
        generators = None if params.greedy else make_generators(len(images), seed, self.device)
        chats: list[list[Message]] = []
        report_variants: list[str] = []
        for ctx in contexts:
            first, variant = p.report_message(ctx.age_years if ctx else None)
            chats.append([Message("system", p.system), Message("user", first)])
            report_variants.append(variant)

        def turn(rows: list[bool], limit: SamplingParams) -> list[str | None]:
            seqs = [
                tokenize_with_image(render_llama2(c, tok.bos_token, tok.eos_token), tok)
                if r
                else None
                for c, r in zip(chats, rows, strict=True)
            ]
            ids = generate_turn(
                batch,
                seqs,
                limit,
                generators=generators,
                stop=self._keyword_stop,
                context_limit=self.config.max_context_length,
            )
            return [tok.stream_decode(g) if r else None for g, r in zip(ids, rows, strict=True)]

        every = [True] * len(images)
        answers: dict[str, list[str]] = {"report": turn(every, params)}
        answers |= {"differential": [""] * len(images), "recommendation": [""] * len(images)}
        followups = (("differential", p.differential), ("recommendation", p.recommendation))
        last = answers["report"]
        for name, question in () if report_only else followups:
            for chat, answer in zip(chats, last, strict=True):
                chat += [Message("assistant", answer), Message("user", question)]
            answers[name] = last = turn(every, params)

        pathologies = tuple(n for n in FINDINGS if n != "no_finding")
        findings, sources = [], []
        for report in answers["report"]:
            states = {k: STATES[v] for k, v in label_report(report.strip()).items()}
            findings.append(states)
            sources.append(dict.fromkeys(states, "report"))

        if p.confirm_findings:
            self._confirm(chats, last, findings, sources, pathologies, turn, params)

        timings = {
            "encode": t_encode,
            "prefill": batch.timings["prefill"],
            "decode": batch.timings["decode"],
            "total": time.perf_counter() - t0,
        }
        variants = p.variants()
        if report_only:
            variants |= {"differential": "skipped", "recommendation": "skipped"}
        return [
            ModelResult(
                report=answers["report"][i].strip(),
                differential=answers["differential"][i].strip(),
                recommendation=answers["recommendation"][i].strip(),
                findings=findings[i],
                finding_sources=sources[i],
                prompts={"report": report_variants[i], **variants},
                model_id=self.model_id,
                model_hash=self.model_hash,
                timings=dict(timings),
            )
            for i in range(len(images))
        ]

    def _confirm(
        self,
        chats: list[list[Message]],
        last_answers: list[str],
        findings: list[dict[str, str]],
        sources: list[dict[str, str]],
        pathologies: Sequence[str],
        turn: Callable[[list[bool], SamplingParams], list[str | None]],
        params: SamplingParams,
    ) -> None:
        """Ask yes/no for each finding the report leaves uncertain or unmentioned.

        The questions come after the recommendation turn, so the three main answers are the
        same with or without confirmation. A clear "yes"/"no" replaces the report's label and
        is recorded as ``finding_sources[name] = "confirmation"``; anything else keeps it.
        """
        p = self.prompts
        pending = [
            [n for n in pathologies if states.get(n) in ("uncertain", "not_mentioned")]
            for states in findings
        ]
        unanswered = list(last_answers)
        short = SamplingParams(
            params.temperature, params.top_p, params.top_k, p.confirmation_max_new_tokens
        )
        for r in range(max((len(q) for q in pending), default=0)):
            rows = [r < len(q) for q in pending]
            for i, active in enumerate(rows):
                if active:
                    question = p.confirmation_question(pending[i][r])
                    chats[i] += [Message("assistant", unanswered[i]), Message("user", question)]
            replies = turn(rows, short)
            for i, reply in enumerate(replies):
                if reply is None:
                    continue
                unanswered[i] = reply
                match = _YES_NO.match(reply)
                if not match:
                    continue
                name = pending[i][r]
                findings[i][name] = "present" if match.group(1).lower() == "yes" else "absent"
                sources[i][name] = "confirmation"
                if findings[i][name] == "present" and findings[i].get("no_finding") == "present":
                    findings[i]["no_finding"] = "not_mentioned"
                    sources[i]["no_finding"] = "confirmation"

    def _keyword_stop(self, generated: list[int]) -> bool:
        """The reference's ``KeywordsStoppingCriteria``: "</s>" in the last three tokens' text."""
        return self.tokenizer.eos_token in self.tokenizer.decode(generated[-3:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

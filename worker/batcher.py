"""Micro-batching of concurrent inference requests into one batched generation.

An inference worker runs Celery's thread pool with as many threads as the largest batch.
Each infer task hands its image to :class:`MicroBatcher` and waits; a single model thread
collects requests until the batch is full or ``max_wait`` has passed since the first one,
runs one ``ReportEngine.generate`` call for the whole batch and hands each task its result.
The model is loaded once per process, on first use, and loading is retried (not cached as
a failure) so a model that appears later is picked up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.contracts import GenerationParams, StudyContext

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No usable model in this worker (missing, unreadable or failing to load)."""


@dataclass
class Request:
    image: np.ndarray
    context: StudyContext
    params: GenerationParams  # only requests with equal parameters are batched
    future: Future = field(default_factory=Future)


class MicroBatcher:
    def __init__(
        self,
        load_engine: Callable[[], Any],
        max_batch: int = 8,
        max_wait: float = 0.5,
        retry_load_after: float = 10.0,
        gap: float = 0.05,
    ) -> None:
        self._load_engine = load_engine
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.retry_load_after = retry_load_after
        self.gap = gap
        self._engine: Any = None
        self._load_error: tuple[float, str] | None = None
        self._queue: queue.Queue[Request] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()
        self.batches_run = 0

    def submit(self, image: np.ndarray, context: StudyContext, params: GenerationParams) -> Future:
        """Queue one study; the future resolves to its :class:`ModelResult`."""
        request = Request(image, context, params)
        self._queue.put(request)
        return request.future

    def engine(self) -> Any:
        """The loaded engine; raises ModelUnavailable (quickly, if it failed just before)."""
        if self._engine is not None:
            return self._engine
        if self._load_error and time.monotonic() - self._load_error[0] < self.retry_load_after:
            raise ModelUnavailable(self._load_error[1])
        try:
            self._engine = self._load_engine()
        except Exception as exc:
            message = f"model cannot be loaded: {exc}"
            self._load_error = (time.monotonic(), message)
            raise ModelUnavailable(message) from exc
        self._load_error = None
        return self._engine

    def _collect(self) -> list[Request]:
        """Wait for a first request, then gather more until the batch is full, ``max_wait``
        has passed, or the stream has paused for ``gap`` (no point waiting for studies that
        are not coming: a lone study is not delayed by the full ``max_wait``)."""
        first = self._queue.get()
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = min(deadline - time.monotonic(), self.gap)
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            groups: dict[GenerationParams, list[Request]] = {}
            for request in batch:
                groups.setdefault(request.params, []).append(request)
            for params, requests in groups.items():
                self._generate(params, requests)

    def _generate(self, params: GenerationParams, requests: list[Request]) -> None:
        try:
            engine = self.engine()
        except ModelUnavailable as exc:
            for request in requests:
                request.future.set_exception(exc)
            return
        batch_id = uuid.uuid4().hex
        try:
            results = engine.generate(
                [r.image for r in requests], [r.context for r in requests], **params.to_dict()
            )
        except Exception as exc:
            log.exception("batched generation of %d studies failed", len(requests))
            for request in requests:
                request.future.set_exception(exc)
            return
        self.batches_run += 1
        for request, result in zip(requests, results, strict=True):
            request.future.set_result(result.with_batch(batch_id, len(requests), None))

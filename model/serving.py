"""``ReportServer``: the engine behind a thread-safe ``submit`` that returns futures.

The Celery inference worker wraps one server per process (one process per GPU). Its threads
call ``submit`` and wait on the future; the server's own scheduling thread runs the continuous
batching loop of ``model.scheduler``, so a study joins the running batch between two decode
steps instead of waiting for a batch to fill or to finish.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from model.consensus import vote
from model.contracts import GenerationParams, ModelResult, StudyContext
from model.generate import MAX_NEW_TOKENS, SamplingParams
from model.pipeline import ReportEngine, StudyConversation
from model.scheduler import SchedulerStats

log = logging.getLogger(__name__)


class ServerClosed(RuntimeError):
    """The server was closed before this study ran."""


@dataclass
class _Request:
    conversation: StudyConversation
    future: Future


def _voted(futures: list[Future[ModelResult]], min_agreement: float) -> Future[ModelResult]:
    """A future of the vote of ``futures`` (a study's samples), failed if any of them fails."""
    combined: Future[ModelResult] = Future()
    lock = threading.Lock()

    def settle(_: Future) -> None:
        with lock:
            if combined.done() or not all(f.done() for f in futures):
                return
            try:
                combined.set_result(vote([f.result() for f in futures], min_agreement))
            except BaseException as exc:
                combined.set_exception(exc)

    for future in futures:
        future.add_done_callback(settle)
    return combined


class ReportServer:
    """Continuous-batching report server over one ``ReportEngine`` (one GPU).

    Usage, from any number of threads::

        server = ReportServer(ReportEngine.load(path), max_batch=16, worker="infer@gpu0")
        future = server.submit(image, StudyContext(age_years=54), GenerationParams(temperature=0))
        result = future.result()  # a ModelResult
        ...
        server.close()            # or use the server as a context manager

    ``submit`` preprocesses the image in the calling thread (so the GPU loop never waits on
    PIL) and raises ``UnsupportedImageError`` or ``ValueError`` there for an image the model
    does not take; everything else arrives through the future. Requests with different
    ``GenerationParams`` share decode steps: temperature, top-p, top-k and the token budget are
    applied per row. A failure of one study (say, its chat outgrows ``capacity``) fails its
    future only; a failure of the model (say, CUDA out of memory) fails the studies running at
    that moment, and the server goes on with the next ones.

    What a result says about its batch: there is no fixed batch under continuous batching, so

    * ``batch_id`` is ``"<server id>-<n>"``, the admission group: studies that took free slots
      in the same scheduler round and were encoded by the vision tower together share it;
    * ``batch_size`` is the most studies that decoded in one step together with this one
      (itself included), i.e. how much batching it got at best;
    * ``worker`` is the ``worker`` given here; ``timings`` has queued / encode / prefill /
      decode / first_token / total seconds (``model.scheduler.StudyStats``).

    Parameters
    ----------
    engine:
        The loaded engine. The server drives its model from its own thread; do not call
        ``engine.generate`` while the server runs.
    max_batch:
        KV-cache slots: studies decoded together. Each slot holds ``capacity`` positions
        (about 0.5 MB per position for the 7B model in bf16, so 1.5 GB at the default).
    capacity:
        Positions per slot; default enough for three 512-token answers (plus the confirmation
        turns when the engine's prompts ask for them).
    sync_every:
        Decode steps between two reads of the device state (see ``model.scheduler``).
    worker:
        Stamped on every result as ``ModelResult.worker``.
    """

    def __init__(
        self,
        engine: ReportEngine,
        max_batch: int = 16,
        *,
        capacity: int | None = None,
        sync_every: int = 8,
        worker: str | None = None,
        **scheduler_options,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, found {max_batch}.")
        self.engine = engine
        self.max_batch = max_batch
        self.worker = worker
        self.id = uuid.uuid4().hex[:12]
        self._scheduler = engine.scheduler(
            max_batch,
            capacity=capacity,
            max_new_tokens=MAX_NEW_TOKENS,
            sync_every=sync_every,
            **scheduler_options,
        )
        self._scheduler.decoder.warm_up()  # CUDA graphs captured before the first study
        self._incoming: deque[_Request] = deque()
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._cancel_pending = False
        self._thread = threading.Thread(target=self._loop, name=f"report-server-{self.id}")
        self._thread.daemon = True
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(
        self,
        image: np.ndarray,
        context: StudyContext | None = None,
        params: GenerationParams | None = None,
        *,
        seed: int | None = None,
    ) -> Future[ModelResult]:
        """Queue one study (uint8 grayscale HxW) and return the future of its ``ModelResult``.

        ``seed`` fixes the study's draws when sampling (the same seed gives the same answers
        whatever else runs with it). Raises ``ServerClosed`` after ``close``.

        ``params.samples`` > 1 queues that many samples of the study together (one image
        encoding, one prompt prefill) and resolves the future to their vote
        (``model.consensus``).
        """
        params = params or GenerationParams()
        sampling = SamplingParams(
            params.temperature, params.top_p, params.top_k, params.max_new_tokens
        )
        conversations = self.engine.samples(image, context, sampling, params.samples, seed=seed)
        futures: list[Future[ModelResult]] = [Future() for _ in conversations]
        with self._lock:
            if self._closing:
                raise ServerClosed("the report server is closed; no new studies are taken.")
            for conversation, future in zip(conversations, futures, strict=True):
                self._incoming.append(_Request(conversation, future))
            self._wakeup.notify()
        if len(futures) == 1:
            return futures[0]
        return _voted(futures, params.min_agreement)

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop taking studies, finish the ones already submitted (or, with
        ``cancel_pending``, fail those not yet running with ``ServerClosed``), stop the thread."""
        with self._lock:
            self._closing = True
            self._cancel_pending = cancel_pending
            self._wakeup.notify()
        self._thread.join(timeout)

    def __enter__(self) -> ReportServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def stats(self) -> SchedulerStats:
        """Totals of the scheduler (decode steps, prefill tokens, syncs...)."""
        return self._scheduler.stats

    @property
    def running(self) -> int:
        """Studies holding a slot now."""
        return self._scheduler.running

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        scheduler = self._scheduler
        while True:
            with self._lock:
                while not (self._incoming or scheduler.busy or self._closing):
                    self._wakeup.wait()
                if self._closing and self._cancel_pending:
                    self._fail_waiting(scheduler)
                incoming, self._incoming = list(self._incoming), deque()
                if self._closing and not incoming and not scheduler.busy:
                    return
            for request in incoming:
                if request.future.set_running_or_notify_cancel():
                    self._futures[id(request.conversation)] = request.future
                    scheduler.add(request.conversation)
            try:
                scheduler.iterate()
            except Exception:
                log.exception("model step failed; the studies running in it have failed")
            self._deliver()

    def _fail_waiting(self, scheduler) -> None:
        closed = ServerClosed("the report server was closed before this study ran.")
        for request in self._incoming:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(closed)
        self._incoming.clear()
        while scheduler.waiting:
            conv = scheduler.waiting.popleft()
            self._futures.pop(id(conv)).set_exception(closed)

    def _deliver(self) -> None:
        done, failed = self._scheduler.drain()
        for conv in done:
            future = self._futures.pop(id(conv))
            try:
                result = conv.result().with_batch(
                    f"{self.id}-{conv.stats.group}", max(conv.stats.peak_batch, 1), self.worker
                )
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
        for conv, exc in failed:
            self._futures.pop(id(conv)).set_exception(exc)

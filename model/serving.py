"""``ReportServer``: the engine behind a thread-safe ``submit`` that returns futures.

The Celery inference worker wraps one server per process (one process per GPU). Its threads
call ``submit`` and wait on the future; the server's own scheduling thread runs the continuous
batching loop of ``model.scheduler``, so a study joins the running batch between two decode
steps instead of waiting for a batch to fill or to finish.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from model.consensus import vote
from model.contracts import GenerationParams, ModelResult, StudyContext
from model.failsafe import is_device_lost, is_out_of_memory
from model.generate import MAX_NEW_TOKENS, SamplingParams
from model.pipeline import ReportEngine, StudyConversation
from model.scheduler import SchedulerStats

log = logging.getLogger(__name__)


class ServerClosed(RuntimeError):
    """The server was closed before this study ran."""


class _NoScheduler:
    """Stands in for the scheduler while none can be built: idle, never busy."""

    busy = False
    running = 0
    waiting: deque = deque()
    stats = SchedulerStats()

    def add(self, conversation) -> None:
        raise ServerClosed("the report server has no model batch that fits the device.")

    def iterate(self) -> None:
        return None

    def drain(self) -> tuple[list, list]:
        return [], []


_EMPTY = _NoScheduler()


@dataclass
class _Request:
    conversation: StudyConversation
    future: Future
    rebuild: Callable[[], StudyConversation] | None = None  # the same study, from the start


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
    future only. When the device runs out of memory, the batch is halved (a new scheduler with
    half the slots) and the studies that were running start again: none fails, one warning
    (``model.failsafe``). When the device is lost, ``on_device_lost`` is called (the inference
    worker exits there, to be restarted); any other failure of the model fails the studies
    running at that moment, and the server goes on with the next ones.

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
    on_device_lost:
        Called with the exception when the device is lost (``model.failsafe.is_device_lost``),
        from the server's thread, after the running studies have failed.
    """

    def __init__(
        self,
        engine: ReportEngine,
        max_batch: int = 16,
        *,
        capacity: int | None = None,
        sync_every: int = 8,
        worker: str | None = None,
        on_device_lost: Callable[[BaseException], None] | None = None,
        **scheduler_options,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, found {max_batch}.")
        self.engine = engine
        self.max_batch = max_batch
        self.worker = worker
        self.id = uuid.uuid4().hex[:12]
        self._on_device_lost = on_device_lost
        self._scheduler_options = (
            dict(capacity=capacity, max_new_tokens=MAX_NEW_TOKENS, sync_every=sync_every)
            | scheduler_options
        )
        self._scheduler = engine.scheduler(max_batch, **self._scheduler_options)
        self._scheduler.decoder.warm_up()  # CUDA graphs captured before the first study
        self._rebuild: dict[int, Callable[[], StudyConversation]] = {}
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
                # after an out-of-memory the same sample starts again, with its own seed
                rebuild = functools.partial(
                    self.engine.conversation, image, context, sampling, seed=conversation.seed
                )
                self._incoming.append(_Request(conversation, future, rebuild))
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
        while True:
            scheduler = self._scheduler
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
                    if request.rebuild is not None:
                        self._rebuild[id(request.conversation)] = request.rebuild
                    scheduler.add(request.conversation)
            try:
                scheduler.iterate()
            except Exception as exc:
                if not self._recover(scheduler, exc):
                    log.exception("model step failed; the studies running in it have failed")
                    if is_device_lost(exc) and self._on_device_lost is not None:
                        self._deliver(scheduler)
                        self._on_device_lost(exc)
            self._deliver()

    def _recover(self, scheduler, exc: BaseException) -> bool:
        """After an out-of-memory failure: halve the batch and run its studies again.

        The failed scheduler's KV cache is dropped before one with half the slots is built;
        the studies that were running start over (same seeds, so the same draws) ahead of
        those that were waiting. False when the failure is not a lack of memory, or the
        batch is one study already.
        """
        if not is_out_of_memory(exc) or self.max_batch == 1:
            return False
        retry = [conv for conv, e in scheduler.failed if e is exc]
        scheduler.failed = [(conv, e) for conv, e in scheduler.failed if e is not exc]
        waiting = list(scheduler.waiting)
        scheduler.waiting.clear()
        self._deliver(scheduler)
        before, self.max_batch = self.max_batch, max(1, self.max_batch // 2)
        del scheduler
        self._scheduler = _EMPTY  # the old KV cache goes before the new one is allocated
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self._scheduler = self.engine.scheduler(self.max_batch, **self._scheduler_options)
            self._scheduler.decoder.warm_up()
        except Exception as build_error:  # not even the smaller batch: fail, stop taking more
            log.exception("no smaller batch fits either; the report server stops")
            for conv in retry + waiting:
                self._rebuild.pop(id(conv), None)
                self._futures.pop(id(conv)).set_exception(build_error)
            with self._lock:
                self._closing = True
                self._cancel_pending = True
            self._scheduler = _EMPTY
            return True
        for conv in retry:
            rebuild = self._rebuild.pop(id(conv))
            fresh = rebuild()
            fresh.stats.submitted = conv.stats.submitted
            self._futures[id(fresh)] = self._futures.pop(id(conv))
            self._rebuild[id(fresh)] = rebuild
            self._scheduler.add(fresh)
        for conv in waiting:
            self._scheduler.add(conv)
        log.warning(
            "out of memory with %d studies running (%s): batch halved from %d to %d studies; "
            "those studies start again",
            len(retry),
            str(exc).splitlines()[0][:200],
            before,
            self.max_batch,
        )
        return True

    def _fail_waiting(self, scheduler) -> None:
        closed = ServerClosed("the report server was closed before this study ran.")
        for request in self._incoming:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(closed)
        self._incoming.clear()
        while scheduler.waiting:
            conv = scheduler.waiting.popleft()
            self._rebuild.pop(id(conv), None)
            self._futures.pop(id(conv)).set_exception(closed)

    def _deliver(self, scheduler=None) -> None:
        done, failed = (scheduler or self._scheduler).drain()
        for conv in done:
            self._rebuild.pop(id(conv), None)
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
            self._rebuild.pop(id(conv), None)
            self._futures.pop(id(conv)).set_exception(exc)

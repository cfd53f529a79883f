"""The inference worker's model: loaded once per process, on first use, behind a
continuous-batching server (:class:`model.serving.ReportServer`).

An inference worker runs Celery's thread pool with as many threads as the server has slots.
Each ``infer_report`` task submits its study and waits on the future; between two decode steps
a finished study's slot takes the next waiting one, so a study never waits for a batch to
fill or to finish. Loading is retried (a failure is not cached for longer than
``retry_load_after`` seconds), so a model copied in later is picked up.

Fail-safes of the GPU path (``model.failsafe``): loading refuses a checkpoint that cannot fit
the device's free memory, with the numbers (``model.loader.CheckpointTooBig``, reported as
``ModelUnavailable``); an out-of-memory batch is halved and its studies run again, and a failed
CUDA graph capture falls back to eager decoding (both inside the server, one warning each); a
lost device makes this process exit with ``DEVICE_LOST_EXIT``: its CUDA context cannot be used
again, so its supervisor (``cxrnode serve``, or ``python -m worker --gpus``) starts a new one and
the node's reconciler re-sends the studies this worker held.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from model.contracts import GenerationParams, StudyContext

log = logging.getLogger(__name__)

#: Exit status of an inference worker whose device was lost (EX_TEMPFAIL: start it again).
DEVICE_LOST_EXIT = 75


class ModelUnavailable(RuntimeError):
    """No usable model in this worker (missing, unreadable or failing to load)."""


class ModelHost:
    """Loads the engine lazily and hands studies to its report server."""

    def __init__(
        self,
        load_engine: Callable[[], Any],
        max_batch: int = 8,
        worker: str | None = None,
        retry_load_after: float = 10.0,
        exit_process: Callable[[int], Any] = os._exit,
    ) -> None:
        self._load_engine = load_engine
        self.max_batch = max_batch
        self.worker = worker
        self.retry_load_after = retry_load_after
        self._exit_process = exit_process
        self._server: Any = None
        self._load_error: tuple[float, str] | None = None
        self._lock = threading.Lock()

    def server(self) -> Any:
        """The running server; raises ModelUnavailable (at once if loading failed just now)."""
        with self._lock:
            if self._server is not None:
                return self._server
            if self._load_error and time.monotonic() - self._load_error[0] < self.retry_load_after:
                raise ModelUnavailable(self._load_error[1])
            try:
                started = time.perf_counter()
                engine = self._load_engine()  # raises at once when no model is configured
                log.info("model loaded in %.2f s", time.perf_counter() - started)
                from model.serving import ReportServer  # torch: only once there is a model

                self._server = ReportServer(
                    engine,
                    max_batch=self.max_batch,
                    worker=self.worker,
                    on_device_lost=self._device_lost,
                )
            except Exception as exc:
                message = f"model cannot be loaded: {exc}"
                self._load_error = (time.monotonic(), message)
                log.warning("%s", message)
                raise ModelUnavailable(message) from exc
            self._load_error = None
            return self._server

    def _device_lost(self, exc: BaseException) -> None:
        """Exit the process (see the module docstring); called from the server's thread."""
        log.critical(
            "the model's device is lost (%s: %s); exiting with status %d so that this worker "
            "is restarted and its studies re-sent",
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
            DEVICE_LOST_EXIT,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit_process(DEVICE_LOST_EXIT)

    def submit(self, image: np.ndarray, context: StudyContext, params: GenerationParams) -> Future:
        """Queue one study; the future resolves to its ``ModelResult``.

        When it does, the server's totals (studies, encode/prefill/decode seconds, prefill
        tokens, decode steps) are logged as one JSON line at INFO: what bench/fullsize.py reads.
        """
        server = self.server()
        future = server.submit(image, context, params)
        future.add_done_callback(lambda _: self._log_totals(server))
        return future

    def _log_totals(self, server: Any) -> None:
        try:
            totals = dataclasses.asdict(server.stats)
        except (TypeError, AttributeError):  # a stand-in without dataclass stats
            return
        log.info("model totals %s", json.dumps(totals, separators=(",", ":")))

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close(cancel_pending=True)
                self._server = None

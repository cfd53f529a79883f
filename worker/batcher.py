"""The inference worker's model: loaded once per process, on first use, behind a
continuous-batching server (:class:`model.serving.ReportServer`).

An inference worker runs Celery's thread pool with as many threads as the server has slots.
Each ``infer_report`` task submits its study and waits on the future; between two decode steps
a finished study's slot takes the next waiting one, so a study never waits for a batch to
fill or to finish. Loading is retried (a failure is not cached for longer than
``retry_load_after`` seconds), so a model copied in later is picked up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from model.contracts import GenerationParams, StudyContext

log = logging.getLogger(__name__)


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
    ) -> None:
        self._load_engine = load_engine
        self.max_batch = max_batch
        self.worker = worker
        self.retry_load_after = retry_load_after
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
                engine = self._load_engine()  # raises at once when no model is configured
                from model.serving import ReportServer  # torch: only once there is a model

                self._server = ReportServer(engine, max_batch=self.max_batch, worker=self.worker)
            except Exception as exc:
                message = f"model cannot be loaded: {exc}"
                self._load_error = (time.monotonic(), message)
                log.warning("%s", message)
                raise ModelUnavailable(message) from exc
            self._load_error = None
            return self._server

    def submit(self, image: np.ndarray, context: StudyContext, params: GenerationParams) -> Future:
        """Queue one study; the future resolves to its ``ModelResult``."""
        return self.server().submit(image, context, params)

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close(cancel_pending=True)
                self._server = None

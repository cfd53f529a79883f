"""Publishing work to the broker, always after the commit that made it due.

Every task that carries a job is published through :class:`Dispatcher`, which first marks the
job as waiting in its queue (:mod:`cxrnode.jobs.tracking`) and then sends the message by task
name (the node never imports the task code). Callers commit their database change first and
publish second; if they die in between, the reconciler finds the job in its new state with
nothing waiting or held, and publishes again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrnode.jobs import tracking
from cxrnode.jobs.broker import celery_app, redis_client, wake_scheduler
from cxrnode.outputs.outbox import SendBatch
from cxrnode.prepare.images import encode_model_input
from cxrnode.settings import Settings
from model.contracts import GenerationParams, StudyContext


def generation_params(settings: Settings) -> GenerationParams:
    return GenerationParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        samples=settings.consensus_samples,
        min_agreement=settings.consensus_min_agreement,
    )


class Dispatcher:
    """Sends the pipeline's task messages for one process (node or worker)."""

    def __init__(self, settings: Settings, celery: Any = None, redis: Any = None) -> None:
        self.settings = settings
        self.celery = celery if celery is not None else celery_app(settings)
        self.redis = redis if redis is not None else redis_client(settings)

    def job_task(self, task: str, job_id: int, version: int, *args: Any) -> None:
        """Publish ``cxrnode.<task>(job_id, version, *args)``, marked as waiting first."""
        keys = [tracking.job_key(job_id)]
        tracking.mark_waiting(self.redis, keys, task)
        self.celery.send_task(
            f"cxrnode.{task}", args=(job_id, version, *args), headers={tracking.KEYS_HEADER: keys}
        )

    def prepare_image(self, job_id: int, version: int) -> None:
        self.job_task("prepare_image", job_id, version)

    def infer_report(
        self, job_id: int, version: int, image: np.ndarray, context: StudyContext
    ) -> None:
        """Hand a prepared study to the inference queue: the message carries everything the
        GPU side needs (image, context, decoding parameters), so it needs no database."""
        self.job_task(
            "infer_report",
            job_id,
            version,
            encode_model_input(image),
            context.to_dict(),
            generation_params(self.settings).to_dict(),
        )

    def send_outputs(self, batches: list[SendBatch]) -> None:
        """Publish one send message per study and destination; each output it carries is
        tracked (waiting, then held) like a job, so a lost message is noticed quickly."""
        for batch in batches:
            keys = [tracking.output_key(output_id) for output_id in batch.output_ids]
            tracking.mark_waiting(self.redis, keys, "send_outputs")
            self.celery.send_task(
                "cxrnode.send_outputs",
                args=(batch.destination, batch.output_ids),
                headers={tracking.KEYS_HEADER: keys},
            )

    def wake_scheduler(self) -> None:
        wake_scheduler(self.redis)

    def close(self) -> None:
        try:
            self.redis.close()
        finally:
            self.celery.close()

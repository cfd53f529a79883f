"""Publishing task messages to the broker, always after the commit that made them due.

Every message (:mod:`cxrnode.jobs.messages`) is published through :meth:`Dispatcher.publish`,
which first marks what it carries as waiting in its queue (:mod:`cxrnode.jobs.tracking`) and
then sends it to the task its class names (the node never imports the task code). Callers
commit their database change first and publish second; if they die in between, the
reconciler finds the job in its new state with nothing waiting or held, and publishes again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cxrnode.jobs import tracking
from cxrnode.jobs.broker import celery_app, redis_client, wake_scheduler
from cxrnode.jobs.messages import (
    Message,
    PrepareImage,
    SendOutputs,
    WakeScheduler,
    host_queue,
)
from cxrnode.outputs.outbox import SendBatch
from cxrnode.settings import Settings


class Dispatcher:
    """Sends the pipeline's task messages for one process (node or worker)."""

    def __init__(self, settings: Settings, celery: Any = None, redis: Any = None) -> None:
        self.settings = settings
        self.celery = celery if celery is not None else celery_app(settings)
        self.redis = redis if redis is not None else redis_client(settings)

    def publish(self, *messages: Message, node_host: str | None = None) -> None:
        """Publish each message to its task, marked as waiting first (a
        :class:`WakeScheduler` wakes the scheduler instead).

        A message of a host-bound queue (prepare, outputs, send) goes to the copy of that
        queue of ``node_host``, the node host whose DATA_DIR holds the files its step needs
        (default: this process's own, ``NODE_HOST``); ``infer`` is one queue for all.
        """
        host = node_host or self.settings.node_host
        for message in messages:
            if isinstance(message, WakeScheduler):
                self.wake_scheduler()
                continue
            if not message.task:
                raise ValueError(f"{type(message).__name__} runs in-process; it is never published")
            keys = message.tracking_keys()
            tracking.mark_waiting(self.redis, keys, message.stage)
            self.celery.send_task(
                message.task,
                args=(message.to_wire(),),
                headers={tracking.KEYS_HEADER: keys},
                queue=host_queue(message.queue, host),
            )

    def prepare_image(self, job_id: int, version: int, node_host: str | None = None) -> None:
        """Publish :class:`PrepareImage` for a job its caller just queued, to the queue of
        the host holding its image (``node_host``, the job's)."""
        self.publish(PrepareImage(job_id, version), node_host=node_host)

    def send_outputs(self, batches: Iterable[SendBatch]) -> None:
        """Publish one :class:`SendOutputs` per claimed study and destination, to the queue
        of the host holding the files; each output it carries is tracked (waiting, then
        held) like a job, so a lost message is noticed quickly."""
        for b in batches:
            self.publish(SendOutputs(b.destination, tuple(b.output_ids)), node_host=b.node_host)

    def wake_scheduler(self) -> None:
        wake_scheduler(self.redis)

    def close(self) -> None:
        try:
            self.redis.close()
        finally:
            self.celery.close()

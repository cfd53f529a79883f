"""The Celery application of the workers (`cxrnode worker`, `python -m worker`, or
`celery -A worker.app`), and the heartbeat each worker process publishes.

The heartbeat (:class:`cxrnode.jobs.tracking.Heartbeat`) names the worker's queues, its
state (an inference worker: whether its model is loaded, which one, on which device) and the
jobs it holds: a job counts as held from the moment its message is *received* (prefetched
messages included) until its task finishes. That is what lets the node tell a slow job from a
lost one (``cxrnode.jobs.tracking``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import signals

from cxrnode.jobs.broker import celery_app, redis_client
from cxrnode.jobs.messages import BadMessage, base_queue, consumed_queues, message_type
from cxrnode.jobs.tracking import Heartbeat
from cxrnode.settings import get_settings

log = logging.getLogger(__name__)

app = celery_app(get_settings())
app.conf.include = ["worker.tasks"]

#: This process's heartbeat (set when the worker is ready).
heartbeat: Heartbeat | None = None
#: The exit status of this process's worker (its WorkController's, when it shut down).
exit_status = 0


def worker_name(queues: list[str]) -> str:
    """Unique per process: several workers of the same queues may share a host."""
    return f"{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"


def tracking_keys(name: str, args: Any) -> list[str]:
    """The tracking keys of a task message (see ``cxrnode.jobs.tracking``), as its message
    class says: its job, or the outputs a send carries. A message this release cannot read
    holds nothing (its task refuses it, and the reconciler sends it again)."""
    message_class = message_type(name)
    if message_class is None or not args or len(args) != 1:
        return []
    try:
        return message_class.from_wire(args[0]).tracking_keys()
    except BadMessage:
        return []


def _request_keys(request: Any) -> list[str]:
    name = getattr(request, "name", None) or getattr(getattr(request, "task", None), "name", "")
    return tracking_keys(name, getattr(request, "args", None))


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global heartbeat
    # the queues by their plain names (a node host's copies are named in its state): what
    # `--queues` asked for, as `cxrnode status` and the readiness checks count them
    consumed = sender.app.amqp.queues.consume_from.values()
    queues = sorted({base_queue(q.name) for q in consumed})
    heartbeat = Heartbeat(redis_client(get_settings()), sender.hostname, queues)
    if any(q.name != base_queue(q.name) for q in consumed):
        heartbeat.state["node_host"] = get_settings().node_host
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        heartbeat.state["gpu"] = os.environ["CUDA_VISIBLE_DEVICES"]  # `worker --gpus`
    heartbeat.start()
    if "infer" in queues:  # load the model now, not with the first study: readiness is true
        threading.Thread(target=_load_model, name="model-loader", daemon=True).start()


def _load_model() -> None:
    import worker.tasks
    from worker.batcher import ModelUnavailable

    try:
        worker.tasks.model_host().server()
    except ModelUnavailable as exc:  # retried with the first study; the heartbeat says why
        if heartbeat is not None:
            heartbeat.set_state(model="unavailable", model_error=str(exc))


@signals.worker_shutdown.connect
def _stop_heartbeat(sender: Any = None, **_: Any) -> None:
    import worker.tasks

    global exit_status
    exit_status = int(getattr(sender, "exitcode", None) or 0)

    if worker.tasks.model_host.cache_info().currsize:
        worker.tasks.model_host().close()
    if heartbeat is not None:
        heartbeat.stop()


@signals.task_received.connect
def _hold(request: Any = None, **_: Any) -> None:
    if heartbeat is not None:
        heartbeat.hold(_request_keys(request))


@signals.task_postrun.connect
def _release(task: Any = None, args: Any = None, **_: Any) -> None:
    if heartbeat is not None and task is not None:
        heartbeat.release(tracking_keys(task.name, args))


@signals.task_revoked.connect
@signals.task_rejected.connect
def _release_unrun(request: Any = None, **_: Any) -> None:
    if heartbeat is not None:
        heartbeat.release(_request_keys(request))


def run_worker(queues: list[str], concurrency: int, loglevel: str = "INFO") -> int:
    """Run a worker consuming ``queues`` with a thread pool of ``concurrency`` threads and
    return its exit status.

    Threads, not processes: inference needs one model per process and many waiting tasks
    to batch; the node-side tasks are I/O-bound or release the GIL in numpy and zlib.

    The status is Celery's own (the worker's ``exitcode``, kept by :func:`_stop_heartbeat`):
    1 after an "Unrecoverable error" (e.g. kombu's transport failing when Redis went away),
    0 after a requested stop. ``app.worker_main`` drops it (Celery runs its command line
    with click's standalone mode off and ignores the code it returns), which made such a
    worker exit 0 and a unit with ``Restart=on-failure`` leave it down.
    """
    import worker.tasks  # noqa: F401  (registers the tasks)

    app.worker_main(
        [
            "--quiet",  # no banner: `cxrnode serve` prints its own start-up summary
            "worker",
            f"--queues={','.join(consumed_queues(queues, get_settings().node_host))}",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            f"--hostname={worker_name(queues)}",
            "--without-mingle",
            "--without-gossip",
            "--heartbeat-interval=10",
        ]
    )
    return exit_status

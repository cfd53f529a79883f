"""The pipeline's Celery tasks: thin adapters between the broker and the plain steps.

::

    PrepareImage ─► prepare_image (node: DB + disk) ─► InferReport ─► infer_report (GPU:
    broker only) ─► RecordResult ─► record_result (node: result, outputs, outbox)
    ─► SendOutputs ─► send_outputs (node: network)

Each task is registered under the name its message class declares
(:mod:`cxrnode.jobs.messages`) and takes that message's wire form as its only argument; the
node-side work is a plain step in :mod:`cxrnode.jobs.steps` (tested in-process). An adapter
decodes the message (refusing, with one log line, one it cannot read), opens a session, runs
the step, and publishes the messages it returns: the step has committed by then, so the
next message is published after the commit that made it due.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from cxrnode.db import JobState, make_engine, make_sessionmaker
from cxrnode.jobs import steps
from cxrnode.jobs.dispatch import Dispatcher
from cxrnode.jobs.messages import (
    BuildOutputs,
    InferReport,
    KeepDisplay,
    Message,
    PrepareImage,
    RecordProblem,
    RecordResult,
    SendOutputs,
    SendUrgentOutputs,
    accept,
)
from cxrnode.prepare.display import ImagingError
from cxrnode.prepare.images import decode_model_input
from cxrnode.settings import get_settings
from model.contracts import ModelResult
from worker import app as worker_app
from worker.app import app
from worker.batcher import ModelHost, ModelUnavailable

log = logging.getLogger(__name__)

#: node-side tasks retry while the database is unreachable (a PostgreSQL restart, say);
#: the reconciler covers anything that outlives these retries.
NODE_RETRIES: dict[str, Any] = dict(
    autoretry_for=(OperationalError,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=10,
)


@cache
def sessions() -> Any:
    """Sessions of the node's database (one engine per worker process; node side only)."""
    return make_sessionmaker(make_engine(get_settings().effective_database_url))


@cache
def dispatcher() -> Dispatcher:
    return Dispatcher(get_settings(), celery=app)


# ------------------------------------------------------------------------------- node side


def run_step(
    message_type: type[Message],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    in_process: tuple[type[Message], ...] = (),
) -> str:
    """Decode a task's message, run its step (and those of ``in_process`` next messages),
    publish what is left; return a one-line summary for the task's result."""
    message = accept(message_type, args, kwargs)
    if message is None:
        return "refused"
    published: list[str] = []

    def publish(*next_messages: Message) -> None:
        dispatcher().publish(*next_messages)
        published.extend(type(m).__name__ for m in next_messages)

    with sessions()() as session:
        steps.run(session, get_settings(), message, publish, in_process=in_process, hold=_holding)
    return ", ".join(published) or "nothing next"


@contextmanager
def _holding(keys: list[str]) -> Iterator[None]:
    """Mark ``keys`` held by this worker while an in-process step works on them."""
    heartbeat = worker_app.heartbeat
    if heartbeat is not None and keys:
        heartbeat.hold(keys)
    try:
        yield
    finally:
        if heartbeat is not None and keys:
            heartbeat.release(keys)


@app.task(name=PrepareImage.task, **NODE_RETRIES)
def prepare_image(*args: Any, **kwargs: Any) -> str:
    """:func:`cxrnode.jobs.steps.prepare` (the display image is kept once the inference
    request is published)."""
    return run_step(PrepareImage, args, kwargs, in_process=(KeepDisplay,))


@app.task(name=RecordResult.task, **NODE_RETRIES)
def record_result(*args: Any, **kwargs: Any) -> str:
    """:func:`cxrnode.jobs.steps.record`, then :func:`~cxrnode.jobs.steps.build` in the
    same task (one broker hop less)."""
    return run_step(RecordResult, args, kwargs, in_process=(BuildOutputs, SendUrgentOutputs))


@app.task(name=RecordProblem.task, **NODE_RETRIES)
def record_problem(*args: Any, **kwargs: Any) -> str:
    """:func:`cxrnode.jobs.steps.record_problem`."""
    return run_step(RecordProblem, args, kwargs)


@app.task(name=BuildOutputs.task, **NODE_RETRIES)
def build_outputs(*args: Any, **kwargs: Any) -> str:
    """:func:`cxrnode.jobs.steps.build` (recovery after a lost record_result run)."""
    return run_step(BuildOutputs, args, kwargs, in_process=(SendUrgentOutputs,))


@app.task(name=SendOutputs.task, **NODE_RETRIES)
def send_outputs(*args: Any, **kwargs: Any) -> str:
    """:func:`cxrnode.jobs.steps.send`."""
    return run_step(SendOutputs, args, kwargs)


# ----------------------------------------------------------------------------------- infer


@cache
def model_host() -> Any:
    """The process's model host (the model is loaded on first use, and loading retried)."""

    settings = get_settings()

    def load() -> Any:
        if not settings.model:
            raise RuntimeError("no model configured (set CXRNODE_MODEL to a checkpoint directory)")
        from model.pipeline import ReportEngine

        log.info("loading model %s", settings.model)
        engine = ReportEngine.load(
            settings.model,
            device=settings.device,
            dtype=settings.model_dtype,
            quantize=None if settings.quantize == "none" else settings.quantize,
        )
        if worker_app.heartbeat is not None:
            worker_app.heartbeat.set_state(
                model="loaded",
                model_id=engine.model_id,
                model_hash=engine.model_hash,
                device=str(engine.device),
            )
        return engine

    name = worker_app.heartbeat.name if worker_app.heartbeat is not None else socket.gethostname()
    return ModelHost(
        load,
        max_batch=settings.batch_size,
        worker=name,
        retry_load_after=min(10.0, settings.model_retry_seconds),
    )


@app.task(name=InferReport.task, bind=True, max_retries=None)
def infer_report(self: Task, *args: Any, **kwargs: Any) -> str:
    """Run the model (batched with concurrent tasks). Needs only the broker: results and
    problems go back as messages to the outputs queue of the node host that prepared the
    image (``InferReport.node_host``)."""

    message = accept(InferReport, args, kwargs)
    if message is None:
        return "refused"
    job_id, version = message.job_id, message.version
    reply_to = message.node_host  # the node host holding the prepared images: its outputs queue
    settings = get_settings()
    try:
        image = decode_model_input(message.model_input_b64)
    except ImagingError as exc:
        failed = RecordProblem(job_id, version, JobState.failed, f"bad message: {exc}")
        dispatcher().publish(failed, node_host=reply_to)
        return "failed"
    try:
        result: ModelResult = model_host().submit(image, message.context, message.params).result()
    except ModelUnavailable as exc:
        if worker_app.heartbeat is not None:
            worker_app.heartbeat.set_state(model="unavailable", model_error=str(exc))
        if self.request.retries == 0:
            dispatcher().publish(
                RecordProblem(job_id, version, JobState.waiting_model, str(exc)), node_host=reply_to
            )
        raise self.retry(countdown=settings.model_retry_seconds) from exc
    except Exception as exc:
        if self.request.retries >= 3:
            failed = RecordProblem(job_id, version, JobState.failed, f"inference failed: {exc}")
            dispatcher().publish(failed, node_host=reply_to)
            return "failed"
        raise self.retry(countdown=10 * (self.request.retries + 1)) from exc
    dispatcher().publish(RecordResult(job_id, version, result), node_host=reply_to)
    return "inferred"

"""The pipeline's Celery tasks: thin glue between the broker and the plain functions.

::

    prepare_image (node: DB + disk) ──► infer_report (GPU: broker only)
        ──► record_result (node: result, outputs, outbox) ──► send_outputs (node: network)

Each task that moves a job takes ``(job_id, version, ...)``; the job state machine
(:mod:`cxrnode.jobs.states`) decides whether it may act, so a redelivered or re-sent message
converges with the original. Every task commits its database change before it publishes the
next message (:class:`cxrnode.jobs.dispatch.Dispatcher`).
"""

from __future__ import annotations

import logging
import socket
from functools import cache
from typing import Any

from celery import Task
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from cxrnode import notify
from cxrnode.db import JobState, Output, UrgentDraft, make_engine, make_sessionmaker
from cxrnode.ingest.header import header_dataset, study_context
from cxrnode.jobs import states, tracking
from cxrnode.jobs.dispatch import Dispatcher
from cxrnode.outputs import outbox
from cxrnode.outputs.build import build_outputs as build
from cxrnode.outputs.outbox import Verdict, send_batch
from cxrnode.outputs.sc import fit_radiograph
from cxrnode.prepare.display import ImagingError
from cxrnode.prepare.images import decode_model_input, keep_display, prepare_images
from cxrnode.settings import get_settings
from cxrnode.uids import OutputKind
from model.contracts import GenerationParams, ModelResult, StudyContext
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


# --------------------------------------------------------------------------------- prepare


@app.task(name="cxrnode.prepare_image", **NODE_RETRIES)
def prepare_image(job_id: int, version: int) -> str:
    """Decode the chosen image once; keep its display image and model input; hand the input
    to the inference queue."""

    settings = get_settings()
    with sessions()() as session:
        work = states.prepare_work(session, job_id, version)
        session.rollback()
    if work is None:
        return "nothing to do"
    source = settings.instances_dir / work.instance_path
    try:
        images = prepare_images(settings, source, work.study_instance_uid, work.sop_instance_uid)
    except (ImagingError, OSError) as exc:
        log.warning("job %d: image cannot be prepared: %s", job_id, exc)
        with sessions()() as session:
            states.transition(
                session,
                job_id,
                JobState.failed,
                version=version,
                error=f"image cannot be read: {exc}",
            )
        return "failed"
    context = study_context(header_dataset(work.header))
    with sessions()() as session:
        moved = states.transition(session, job_id, JobState.prepared, version=version)
    if not moved:
        return "superseded or already past prepare"
    dispatcher().infer_report(job_id, version, images.model_input, context)
    # While the model works: keep the display image at the size the Secondary Capture uses,
    # so building the outputs after the answer neither decodes nor resamples the source.
    if OutputKind.SC in settings.outputs:
        keep_display(
            settings, work.study_instance_uid, work.sop_instance_uid, fit_radiograph(images.display)
        )
    return "prepared"


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


@app.task(name="cxrnode.infer_report", bind=True, max_retries=None)
def infer_report(
    self: Task,
    job_id: int,
    version: int,
    image_png: str,
    context: dict[str, Any] | None,
    params: dict[str, Any],
) -> str:
    """Run the model (batched with concurrent tasks). Needs only the broker: results and
    problems go back to the node side as messages."""

    settings = get_settings()
    try:
        request = (
            decode_model_input(image_png),
            StudyContext.from_dict(context),
            GenerationParams.from_dict(params),
        )
    except (TypeError, ValueError) as exc:
        dispatcher().job_task("record_problem", job_id, version, "failed", f"bad message: {exc}")
        return "failed"
    try:
        result: ModelResult = model_host().submit(*request).result()
    except ModelUnavailable as exc:
        if worker_app.heartbeat is not None:
            worker_app.heartbeat.set_state(model="unavailable", model_error=str(exc))
        if self.request.retries == 0:
            dispatcher().job_task("record_problem", job_id, version, "waiting_model", str(exc))
        raise self.retry(countdown=settings.model_retry_seconds) from exc
    except Exception as exc:
        if self.request.retries >= 3:
            message = f"inference failed: {exc}"
            dispatcher().job_task("record_problem", job_id, version, "failed", message)
            return "failed"
        raise self.retry(countdown=10 * (self.request.retries + 1)) from exc
    dispatcher().job_task("record_result", job_id, version, result.to_dict())
    return "inferred"


# --------------------------------------------------------------------- results and outputs


@app.task(name="cxrnode.record_problem", **NODE_RETRIES)
def record_problem(job_id: int, version: int, state: str, reason: str) -> str:
    """A state reported by the inference side, which has no database."""
    with sessions()() as session:
        moved = states.transition(session, job_id, JobState(state), version=version, error=reason)
    return state if moved else "refused"


@app.task(name="cxrnode.record_result", **NODE_RETRIES)
def record_result(job_id: int, version: int, result: dict[str, Any]) -> str:
    """Record the model's answer (once), then build and send the outputs in the same task
    (one broker hop less); if this process dies in between, the reconciler finds the job
    ``inferred`` and publishes build_outputs."""
    try:
        typed = ModelResult.from_dict(result)
    except (TypeError, ValueError) as exc:
        with sessions()() as session:
            states.transition(
                session, job_id, JobState.failed, version=version, error=f"bad result: {exc}"
            )
        return "failed"
    with sessions()() as session:
        moved = states.transition(session, job_id, JobState.inferred, version=version, result=typed)
    if not moved:
        return "already recorded, or superseded"
    return build_and_send(job_id)


@app.task(name="cxrnode.build_outputs", **NODE_RETRIES)
def build_outputs(job_id: int, version: int) -> str:
    """Build the outputs of a recorded result (recovery after a lost record_result run)."""
    return build_and_send(job_id)


def build_and_send(job_id: int) -> str:
    """Write the job's outputs and their outbox rows (the job is then done), and hand them
    to the send queue at once. Rows not claimed here are sent by the scheduler.

    An urgent draft (triage) does not wait behind queued sends: its announcements and its
    outputs are sent from here, ahead of the send queue (a failed try is retried by the
    notifications table and the outbox as usual)."""

    settings = get_settings()
    with sessions()() as session:
        output_ids = build(session, settings, job_id)
    with sessions()() as session:
        announced = session.scalar(select(UrgentDraft.id).where(UrgentDraft.job_id == job_id))
        session.rollback()
    if announced is not None:
        notify.send_due(sessions(), settings)
    if not output_ids:
        return "no outputs to send"
    with sessions()() as session:
        urgent = bool(
            session.scalar(
                select(func.count(Output.id)).where(Output.id.in_(output_ids), Output.priority < 2)
            )
        )
        batches = outbox.due_outputs(
            session, lease_seconds=outbox.lease_seconds(settings), only=output_ids
        )
    if not urgent:
        dispatcher().send_outputs(batches)
        return f"{len(output_ids)} outputs recorded"
    # Held by this worker while sent, like a send message's outputs, so the reconciler does
    # not take the claimed rows for lost and hand them out again.
    keys = [tracking.output_key(i) for batch in batches for i in batch.output_ids]
    heartbeat = worker_app.heartbeat
    if heartbeat is not None:
        heartbeat.hold(keys)
    try:
        for batch in sorted(batches, key=lambda b: not b.destination.startswith("mllp")):
            send_batch(sessions(), settings, batch.destination, batch.output_ids)
    finally:
        if heartbeat is not None:
            heartbeat.release(keys)
    dispatcher().wake_scheduler()
    return f"{len(output_ids)} urgent outputs recorded and sent"


# ------------------------------------------------------------------------------------- send


@app.task(name="cxrnode.send_outputs", **NODE_RETRIES)
def send_outputs(destination: str, output_ids: list[int]) -> str:
    """Send one study's claimed outputs to one destination (one association) and record
    each outcome on its row. Delivery retries are the outbox's, not Celery's: a failed try
    sets the row's next try, and the scheduler is woken to take it up then."""

    outcomes = send_batch(sessions(), get_settings(), destination, output_ids)
    if any(o.verdict == Verdict.retry for o in outcomes.values()):
        dispatcher().wake_scheduler()
    return ", ".join(f"{output_id}: {o.verdict}" for output_id, o in outcomes.items()) or "nothing"

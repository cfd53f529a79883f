"""The pipeline's Celery tasks.

prepare (node: DB + disk)  → infer (GPU: broker only) → deliver (node) → send (node).

Tasks carry ids and small payloads; the database holds the state, so every task is
idempotent: it checks the job's state before acting and its effects are recorded once.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
from functools import cache
from typing import Any

import numpy as np
from celery import Task
from sqlalchemy.exc import OperationalError

from cxrnode.db import JobState, make_engine, make_sessionmaker
from cxrnode.settings import get_settings
from worker.app import app

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
def node_sessions() -> Any:
    """Database sessions for node-side tasks (one engine per worker process)."""
    return make_sessionmaker(make_engine(get_settings().effective_database_url))


def encode_image(image: np.ndarray) -> str:
    """PNG (lossless, ~100-200 KB for 512 x 512) in base64, for a JSON message."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(payload: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return np.asarray(image.convert("L"))


# --------------------------------------------------------------------------------- prepare


@app.task(name="cxrnode.prepare", bind=True, **NODE_RETRIES)
def prepare(self: Task, job_id: int) -> str:
    """Read the chosen image, make the 512 × 512 8-bit model input, hand it to inference."""
    from pydicom import dcmread

    from cxrnode.ingest.header import study_context
    from cxrnode.jobs import states as jobs
    from cxrnode.prepare.display import ImagingError, prepared_image

    settings = get_settings()
    with node_sessions()() as session:
        work = jobs.start_prepare(session, job_id)
    if work is None:
        return "nothing to do"
    path = settings.instances_dir / work.instance_path
    try:
        header = dcmread(path, stop_before_pixels=True)
        image = prepared_image(path, 512, exact=settings.exact_resize)
        context = study_context(header)
    except (ImagingError, OSError, ValueError) as exc:
        log.warning("job %d: image cannot be prepared: %s", job_id, exc)
        with node_sessions()() as session:
            jobs.set_state(session, job_id, JobState.failed, f"image cannot be read: {exc}")
        return "failed"
    params = {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
    }
    infer.apply_async((job_id, work.version, encode_image(image), context.to_dict(), params))
    with node_sessions()() as session:
        jobs.set_state(session, job_id, JobState.prepared)
    return "prepared"


# ----------------------------------------------------------------------------------- infer


@cache
def batcher() -> Any:
    """The process's micro-batcher and (lazily loaded) model."""
    from worker.batcher import MicroBatcher

    settings = get_settings()

    def load() -> Any:
        if not settings.model:
            raise RuntimeError("no model configured (set CXRNODE_MODEL to a checkpoint directory)")
        from model.pipeline import ReportEngine

        log.info("loading model %s", settings.model)
        return ReportEngine.load(settings.model, device=settings.device)

    return MicroBatcher(
        load,
        max_batch=settings.batch_size,
        max_wait=settings.batch_wait,
        gap=settings.batch_gap,
        retry_load_after=min(10.0, settings.model_retry_seconds),
    )


@app.task(name="cxrnode.infer", bind=True, max_retries=None)
def infer(
    self: Task,
    job_id: int,
    version: int,
    image_png: str,
    context: dict[str, Any] | None,
    params: dict[str, Any],
) -> str:
    """Run the model (micro-batched with concurrent tasks); needs only the broker."""
    from worker.batcher import ModelUnavailable

    try:
        result, batch = batcher().submit(decode_image(image_png), context, params).result()
    except ModelUnavailable as exc:
        note.apply_async((job_id, JobState.waiting_model.value, str(exc)))
        raise self.retry(countdown=get_settings().model_retry_seconds) from exc
    except Exception as exc:
        if self.request.retries >= 3:
            note.apply_async((job_id, JobState.failed.value, f"inference failed: {exc}"))
            return "failed"
        raise self.retry(countdown=10 * (self.request.retries + 1)) from exc
    batch["worker"] = f"{self.request.hostname or socket.gethostname()}"
    deliver.apply_async((job_id, result, batch))
    return "inferred"


# ------------------------------------------------------------------------ deliver and notes


@app.task(name="cxrnode.note", **NODE_RETRIES)
def note(job_id: int, state: str, error: str | None) -> None:
    """A state change reported by a worker that has no database (e.g. waiting for a model)."""
    from cxrnode.jobs import states as jobs

    with node_sessions()() as session:
        jobs.set_state(session, job_id, JobState(state), error)


@app.task(name="cxrnode.deliver", **NODE_RETRIES)
def deliver(job_id: int, result: dict[str, Any], batch: dict[str, Any] | None = None) -> str:
    """Store the model's answer on the job, then finish it (outputs) in the same task."""
    from cxrnode.jobs import states as jobs

    with node_sessions()() as session:
        stored = jobs.record_result(session, job_id, result, batch)
    if not stored:
        return "already stored"
    # Build the outputs here rather than through another broker hop (one hop less latency);
    # if this process dies now, the reconciler finds the job `inferred` and sends `finish`.
    return finish(job_id)


@app.task(name="cxrnode.finish", **NODE_RETRIES)
def finish(job_id: int) -> str:
    """Build the SR and SC of an inferred job, record them in the outbox (the job is then
    done) and hand them to the send queue at once. Rows this task does not claim (it died
    first, or the scheduler was quicker) are sent by the scheduler's outbox pass."""
    from cxrnode.outputs import outbox as sender
    from cxrnode.outputs.build import build_outputs

    settings = get_settings()
    with node_sessions()() as session:
        output_ids = build_outputs(session, settings, job_id)
    if not output_ids:
        return "no outputs to send"
    with node_sessions()() as session:
        batches = sender.due_outputs(
            session, lease_seconds=sender.lease_seconds(settings), only=output_ids
        )
    for batch in batches:
        send.apply_async((batch.destination, batch.output_ids))
    return f"{len(output_ids)} outputs recorded"


# ------------------------------------------------------------------------------------- send


@app.task(name="cxrnode.send", **NODE_RETRIES)
def send(destination: str, output_ids: list[int]) -> str:
    """Send one study's due outputs to one destination (one association) and record each
    outcome on its outbox row. Delivery retries are not Celery's: the row's next try is in
    the database, where the scheduler finds it (Celery retries only a database outage)."""
    from cxrnode.outputs.outbox import send_batch

    outcomes = send_batch(node_sessions(), get_settings(), destination, output_ids)
    return ", ".join(f"{output_id}: {o.verdict}" for output_id, o in outcomes.items()) or "nothing"

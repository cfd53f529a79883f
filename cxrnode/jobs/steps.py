"""The node-side steps of the pipeline, as plain functions.

Each step takes a database session, the settings and the message that starts it
(:mod:`cxrnode.jobs.messages`), does its work, and returns the next messages; it publishes
nothing itself. The Celery tasks in ``worker/tasks.py`` are thin adapters (decode the message,
open a session, call the step, publish what it returns), as pynetdicom's event handlers are
for the listener. Tests call the steps directly, with a real database and real files and no
broker or worker process.

::

    PrepareImage ─► prepare ─► InferReport ─► (GPU: worker.tasks.infer_report)
        ─► RecordResult ─► record ─► BuildOutputs ─► build ─► SendOutputs ─► send

Every state change goes through a transition table (:mod:`cxrnode.jobs.states`,
:mod:`cxrnode.outputs.states`) and is committed before the step returns, so the adapter
publishes only what the database already says is due (commit first, then enqueue).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cxrnode import notify
from cxrnode.db import JobState, Output, UrgentDraft
from cxrnode.ingest.header import header_dataset, study_context
from cxrnode.jobs import states
from cxrnode.jobs.messages import (
    BuildOutputs,
    KeepDisplay,
    Message,
    PrepareImage,
    RecordProblem,
    RecordResult,
    SendOutputs,
    SendUrgentOutputs,
    WakeScheduler,
    infer_message,
)
from cxrnode.outputs import outbox
from cxrnode.outputs.build import build_outputs
from cxrnode.outputs.sc import fit_radiograph
from cxrnode.prepare.display import ImagingError
from cxrnode.prepare.images import keep_display, prepare_images
from cxrnode.settings import Settings
from cxrnode.uids import OutputKind

__all__ = [
    "STEPS",
    "build",
    "prepare",
    "record",
    "record_problem",
    "run",
    "send",
    "send_messages",
    "send_urgent",
]

#: Outputs ranked below this (stat 0, ASAP 1) are urgent (``outputs.priority``).
_ROUTINE_RANK = 2

log = logging.getLogger(__name__)


def prepare(session: Session, settings: Settings, message: PrepareImage) -> list[Message]:
    """Decode the chosen image once; keep the model input; move the job to ``prepared``;
    ask for inference, and (when the site makes a Secondary Capture) for the display image
    to be kept while the model works (:class:`KeepDisplay`, run in-process).

    A job that no longer wants preparing (superseded, another version, already past it)
    gets nothing; an unreadable image fails the job with the reason.
    """
    work = states.prepare_work(session, message.job_id, message.version)
    session.rollback()  # no transaction is held while the pixels are decoded
    if work is None:
        return []
    source = settings.instances_dir / work.instance_path
    try:
        images = prepare_images(settings, source, work.study_instance_uid, work.sop_instance_uid)
    except (ImagingError, OSError) as exc:
        log.warning("job %d: image cannot be prepared: %s", message.job_id, exc)
        states.transition(
            session,
            message.job_id,
            JobState.failed,
            version=message.version,
            error=f"image cannot be read: {exc}",
        )
        return []
    context = study_context(header_dataset(work.header))
    if not states.transition(session, message.job_id, JobState.prepared, version=message.version):
        return []
    next_messages: list[Message] = [
        infer_message(settings, message.job_id, message.version, images.model_input, context)
    ]
    if OutputKind.SC in settings.outputs:
        uids = (work.study_instance_uid, work.sop_instance_uid)
        next_messages.append(KeepDisplay(*uids, images.display))
    return next_messages


def keep_display_image(session: Session, settings: Settings, message: KeepDisplay) -> list[Message]:
    """Keep the display image at the size the Secondary Capture uses."""
    display = fit_radiograph(message.display)
    keep_display(settings, message.study_instance_uid, message.sop_instance_uid, display)
    return []


def record(session: Session, settings: Settings, message: RecordResult) -> list[Message]:
    """Record the model's answer on the job (once: a duplicate or late answer is refused by
    the job's transition table) and ask for its outputs."""
    moved = states.transition(
        session, message.job_id, JobState.inferred, version=message.version, result=message.result
    )
    return [BuildOutputs(message.job_id, message.version)] if moved else []


def record_problem(session: Session, settings: Settings, message: RecordProblem) -> list[Message]:
    """Record a state the inference side reported (it has no database)."""
    states.transition(
        session,
        message.job_id,
        JobState(message.state),
        version=message.version,
        error=message.reason,
    )
    return []


def build(session: Session, settings: Settings, message: BuildOutputs) -> list[Message]:
    """Write the job's outputs and their outbox rows (the job is then ``done``), claim those
    rows and hand them to the send queue at once; rows not claimed here are sent by the
    scheduler.

    An urgent draft (triage) waits behind nothing: its announcements (webhooks, e-mail) go
    out from here, and its outputs come back as :class:`SendUrgentOutputs` (the HL7 draft
    first), which the worker sends itself ahead of the send queue; a failed try is retried
    by the notifications table and the outbox as usual."""
    output_ids = build_outputs(session, settings, message.job_id)
    announced = session.scalar(select(UrgentDraft.id).where(UrgentDraft.job_id == message.job_id))
    session.rollback()
    if announced is not None:
        notify.send_due(sessionmaker(bind=session.get_bind()), settings)
    if not output_ids:
        return []
    urgent = bool(
        session.scalar(
            select(func.count(Output.id)).where(
                Output.id.in_(output_ids), Output.priority < _ROUTINE_RANK
            )
        )
    )
    batches = outbox.due_outputs(
        session, lease_seconds=outbox.lease_seconds(settings), only=output_ids
    )
    if not urgent:
        return send_messages(batches)
    ordered = sorted(batches, key=lambda b: not b.destination.startswith("mllp"))
    return [SendUrgentOutputs(b.destination, tuple(b.output_ids)) for b in ordered] + [
        WakeScheduler()
    ]


def send_messages(batches: Iterable[outbox.SendBatch]) -> list[Message]:
    """One :class:`SendOutputs` per claimed batch (one study, one destination)."""
    return [SendOutputs(batch.destination, tuple(batch.output_ids)) for batch in batches]


def send(session: Session, settings: Settings, message: SendOutputs) -> list[Message]:
    """Send one study's claimed outputs to one destination (one association) and record
    each outcome on its row. Delivery retries are the outbox's, not Celery's: a failed try
    sets the row's next try, and the scheduler is woken to take it up then."""
    outcomes = outbox.send_batch(session, settings, message.destination, message.output_ids)
    if any(o.verdict == outbox.Verdict.retry for o in outcomes.values()):
        return [WakeScheduler()]
    return []


def send_urgent(session: Session, settings: Settings, message: SendUrgentOutputs) -> list[Message]:
    """:func:`send`, run by the worker that built an urgent draft (see :func:`build`)."""
    return send(session, settings, message)


#: The step each node-side message starts.
STEPS: dict[type[Message], Callable[[Session, Settings, Any], list[Message]]] = {
    PrepareImage: prepare,
    KeepDisplay: keep_display_image,
    RecordResult: record,
    RecordProblem: record_problem,
    BuildOutputs: build,
    SendOutputs: send,
    SendUrgentOutputs: send_urgent,
}


def run(
    session: Session,
    settings: Settings,
    message: Message,
    publish: Callable[..., None],
    *,
    in_process: Collection[type[Message]] = (),
    hold: Callable[[list[str]], AbstractContextManager[Any]] | None = None,
) -> None:
    """Run the step ``message`` starts and ``publish`` the messages it returns; then run, in
    this process and with the same session, the steps of those whose type is in
    ``in_process`` (after the others were published, so their work overlaps with what the
    published messages start).

    ``record`` runs ``build`` this way (one broker hop less between the model's answer and
    the outputs: if the process dies in between, the job is ``inferred`` with nothing
    waiting, and the reconciler publishes :class:`BuildOutputs`); ``prepare`` keeps the
    display image this way while the model works, and ``build`` sends an urgent draft's
    outputs this way. ``hold`` (the worker's heartbeat) marks what an in-process step works
    on as held while it runs, as the messages a worker receives are.
    """
    next_messages = STEPS[type(message)](session, settings, message)
    publish(*(m for m in next_messages if type(m) not in in_process))
    for next_message in next_messages:
        if type(next_message) in in_process:
            with hold(next_message.tracking_keys()) if hold else nullcontext():
                run(session, settings, next_message, publish, in_process=in_process, hold=hold)

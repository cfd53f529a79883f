"""The outbox sender: deliver recorded outputs (SRs, SC, PDF, HL7) to each destination.

The database is the truth (docs/dicom.md, promise 2). Every object to send is an
:class:`~cxrnode.db.Output` row; a lost task message, a killed worker or a restarted node
therefore loses nothing: the scheduler finds the rows again. The work is in four places:

- :mod:`cxrnode.outputs.claim`: which rows are due, claiming them (:func:`due_outputs`), the
  retry policy and what one try does to a row (:func:`apply_outcome`);
- :mod:`cxrnode.outputs.transports`: DIMSE C-STORE (plain or TLS), DICOMweb STOW-RS and HL7
  over MLLP, and how each answer is classified;
- :mod:`cxrnode.outputs.resend`: an admin's resend;
- this module: :func:`send_batch`, one study's claimed outputs to one destination, with
  no database transaction open while the network is in use.

Destinations are parsed by :mod:`cxrnode.destination`. The names of those modules are
importable from here too, as callers have always imported them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.audit.dicom import destination_batch
from cxrnode.db import Job, Output, OutputState, Study, utcnow
from cxrnode.destination import Destination, DestinationKind, retarget
from cxrnode.logs import expected_network_failures
from cxrnode.outputs.claim import (
    HL7_KIND,
    KIND_ORDER,
    LEGACY_SR_KIND,
    Outcome,
    RetryPolicy,
    SendBatch,
    Verdict,
    apply_outcome,
    batch_order,
    claimed_before,
    due_outputs,
    lease_seconds,
    next_due,
    release_claims,
)
from cxrnode.outputs.resend import configured_for, resend
from cxrnode.outputs.transports import (
    SendItem,
    association_outcome,
    client_ssl_context,
    status_outcome,
    transport_for,
)
from cxrnode.settings import Settings

__all__ = [
    "HL7_KIND",
    "KIND_ORDER",
    "LEGACY_SR_KIND",
    "Destination",
    "DestinationKind",
    "Outcome",
    "RetryPolicy",
    "SendBatch",
    "Verdict",
    "apply_outcome",
    "association_outcome",
    "batch_order",
    "claimed_before",
    "client_ssl_context",
    "configured_for",
    "due_outputs",
    "lease_seconds",
    "next_due",
    "release_claims",
    "resend",
    "retarget",
    "send_batch",
    "status_outcome",
]

log = logging.getLogger(__name__)


def send_batch(
    session: Session,
    settings: Settings,
    destination: str,
    output_ids: Sequence[int],
) -> dict[int, Outcome]:
    """Send outputs of one study to one destination in one association (or one STOW-RS
    request), and record the outcome on each row.

    Only rows still pending for ``destination`` and claimed by :func:`due_outputs` (in
    flight) are sent; the claim is not renewed here (it covers the wait in the queue and the
    send). A duplicate task arriving after the first recorded its outcome finds nothing in
    flight and sends nothing. No database transaction is open while the network is in use:
    ``session`` is read, rolled back, and written (committed) after the sending.

    Returns
    -------
    dict[int, Outcome]
        The outcome of each output sent, by output id (empty when nothing was to be sent).
    """
    policy = RetryPolicy.from_settings(settings)
    rows = session.execute(
        select(Output, Study.study_instance_uid, Job.version)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(
            Output.id.in_(list(output_ids)),
            Output.destination == destination,
            Output.state == OutputState.in_flight,
        )
    ).all()
    rows.sort(key=lambda r: batch_order(r[0], r[2]))
    items = [
        SendItem(
            row.id,
            row.kind,
            row.sop_class_uid,
            row.sop_instance_uid,
            settings.outputs_dir / row.path,
        )
        for row, _, _ in rows
    ]
    study_uid = rows[0][1] if rows else ""
    session.rollback()
    if not items:
        return {}
    _audit_batch(settings, session, destination, study_uid, begin=True)

    try:
        target = Destination.parse(destination)
    except ValueError as exc:
        outcomes = {
            item.output_id: Outcome(Verdict.dead, "bad-destination", str(exc)) for item in items
        }
    else:
        transport = transport_for(target)
        try:
            with expected_network_failures():  # each failure is an outcome, logged below
                outcomes = transport(settings, target, items)
        except Exception as exc:  # a bug or a library surprise must not strand the rows
            log.exception("sending to %s failed unexpectedly", destination)
            failure = Outcome(Verdict.retry, "error", f"unexpected error while sending: {exc!r}")
            outcomes = {item.output_id: failure for item in items}
        failed = [o for o in outcomes.values() if o.verdict in (Verdict.retry, Verdict.dead)]
        (log.warning if failed else log.info)(
            "study %s to %s: %s%s",
            study_uid,
            destination,
            ", ".join(f"{item.kind} {outcomes[item.output_id].status}" for item in items),
            f" ({failed[0].detail})" if failed else "",
        )

    recorded_at = utcnow()
    for output_id, outcome in outcomes.items():
        row = session.get(Output, output_id, with_for_update=True, populate_existing=True)
        if row is None or not apply_outcome(row, outcome, policy, recorded_at):
            continue
        if row.state == OutputState.dead:
            log.warning("output %d to %s is dead: %s", output_id, destination, row.last_error)
    session.commit()
    failures = [o for o in outcomes.values() if o.verdict in (Verdict.retry, Verdict.dead)]
    _audit_batch(
        settings,
        session,
        destination,
        study_uid,
        begin=False,
        ok=not failures,
        why=failures[0].detail if failures else None,
    )
    return outcomes


def _audit_batch(
    settings: Settings, session: Session, destination: str, study_uid: str, **kw: Any
) -> None:
    """The batch's audit record (cxrnode.audit.dicom), read in a session of its own on the
    same database; never fails the send."""
    bind = session.get_bind()
    try:
        destination_batch(settings, lambda: Session(bind), destination, study_uid, **kw)
    except Exception:
        log.exception("cannot write the audit record of a send to %s", destination)

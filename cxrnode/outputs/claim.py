"""Claiming due outputs and the retry policy: which rows are sent next, and what one try does
to a row.

The database is the truth: every object to send is an :class:`~cxrnode.db.Output` row, and
its state moves only through :mod:`cxrnode.outputs.states`. :func:`due_outputs` is the one
query that decides what is sent next (and in which order); it claims the rows it hands out
(``in_flight``, with a lease), so the scheduler's next tick does not enqueue them again. A
send task records each try with :func:`apply_outcome`: delivered, dead (a permanent refusal
or out of tries), or back to ``pending`` with a backoff of ``base * 2**(tries - 1)``
seconds, capped. A lost message is given back by the reconciler (:func:`claimed_before`,
:func:`release_claims`), or, at the latest, when its lease ends.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import Job, Output, OutputState, Study, utcnow
from cxrnode.outputs import states as output_states
from cxrnode.settings import Settings

__all__ = [
    "HL7_KIND",
    "KIND_ORDER",
    "LEGACY_SR_KIND",
    "Outcome",
    "RetryPolicy",
    "SendBatch",
    "Verdict",
    "apply_outcome",
    "batch_order",
    "claimed_before",
    "due_outputs",
    "lease_seconds",
    "next_due",
    "release_claims",
]

#: ``kind`` of the rows made before the text-report SR existed: the TID 1500 SR (air_sr).
LEGACY_SR_KIND = "sr"
#: The order objects travel in within one association: the text report first (what the
#: radiologist opens), then the structured SR, the picture and the PDF.
KIND_ORDER = {"text_sr": 0, "air_sr": 1, LEGACY_SR_KIND: 1, "sc": 2, "pdf": 3}
#: The outbox kind of the HL7 ORU draft; it goes to HL7_DESTINATIONS, the others to DESTINATIONS.
HL7_KIND = "hl7"


# ------------------------------------------------------------------------------ retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a cap and a bounded number of tries."""

    base_seconds: float = 30.0
    max_seconds: float = 600.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds < self.base_seconds:
            raise ValueError(
                f"retry delays must satisfy 0 < base ({self.base_seconds}) <= max "
                f"({self.max_seconds}); check SEND_RETRY_BASE_SECONDS and SEND_RETRY_MAX_SECONDS"
            )
        if self.max_attempts < 1:
            raise ValueError(f"send_max_attempts must be at least 1; got {self.max_attempts}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.send_retry_base_seconds,
            settings.send_retry_max_seconds,
            settings.send_max_attempts,
        )

    def delay(self, tries: int) -> float:
        """Seconds to wait after the ``tries``-th failed try (1, 2, ...)."""
        if tries < 1:
            raise ValueError(f"tries counts failed tries and starts at 1; got {tries}")
        exponent = min(tries - 1, 64)  # 2**64 * base is past any cap
        return min(self.max_seconds, self.base_seconds * 2.0**exponent)


def lease_seconds(settings: Settings) -> float:
    """How long a claimed output is left to its send task before it is handed out again.

    Ten send timeouts (default 300 s): a connect, an association and a few C-STOREs are each
    bounded by one, with room for the task to wait in the queue. Only a lost task makes
    anyone wait for it.
    """
    return 10.0 * settings.send_timeout


class Verdict(enum.StrEnum):
    delivered = "delivered"
    delivered_warning = "delivered_warning"
    retry = "retry"
    dead = "dead"


@dataclass(frozen=True)
class Outcome:
    """What one try did for one object: the verdict, a short status and an explanation."""

    verdict: Verdict
    status: str  # e.g. "0x0000", "0xB007", "rejected-permanent", "no-connection", "HTTP 503"
    detail: str | None = None


def apply_outcome(row: Output, outcome: Outcome, policy: RetryPolicy, now: datetime) -> bool:
    """Record one try on an outbox row in flight (read locked): its new state, status, error
    and next try. Returns False (and changes nothing) when the row is no longer in flight:
    an admin resent it meanwhile, or a duplicate message already recorded this try."""
    attempts = (row.attempts or 0) + 1
    error, next_try_at = outcome.detail, now
    if outcome.verdict in (Verdict.delivered, Verdict.delivered_warning):
        to = OutputState(outcome.verdict.value)
    elif outcome.verdict == Verdict.dead:
        to = OutputState.dead
    elif attempts >= policy.max_attempts:
        to = OutputState.dead
        error = f"gave up after {attempts} tries; last: {outcome.detail}"
    else:
        to = OutputState.pending
        next_try_at = now + timedelta(seconds=policy.delay(attempts))
    return output_states.move(
        row,
        to,
        now=now,
        expect={OutputState.in_flight},
        attempts=attempts,
        last_status=outcome.status,
        last_error=error,
        next_try_at=next_try_at,
    )


# ---------------------------------------------------------------------------------- claiming


class SendBatch(NamedTuple):
    """The due outputs of one study for one destination: one association's worth."""

    destination: str
    study_uid: str
    output_ids: list[int]
    #: the node host whose DATA_DIR holds the files (their job's host; None: before 0005a)
    node_host: str | None = None


def due_outputs(
    session: Session,
    now: datetime | None = None,
    *,
    lease_seconds: float = 300.0,
    only: Iterable[int] | None = None,
    limit: int = 500,
) -> list[SendBatch]:
    """Claim the outputs whose next try is due, grouped by destination, study and node host
    (the one whose DATA_DIR holds the files, which sends them): the one
    query that decides what is sent next (and in which order).

    Due are ``pending`` rows whose ``next_try_at`` has come, and ``in_flight`` rows whose
    claim's lease ran out (their message was lost and nobody noticed sooner). Each claimed
    row moves to ``in_flight`` and its ``next_try_at`` moves ``lease_seconds`` ahead, so
    calling this again (the next scheduler tick) does not hand it out twice; the send task
    then records the real outcome. Rows are taken oldest due first; within a batch they
    travel by :func:`batch_order`. Commits.

    Parameters
    ----------
    only
        Restrict the claim to these output ids (the finish task claims the rows it made).
    """
    now = now or utcnow()
    query = (
        select(Output, Study.study_instance_uid, Job.version, Job.node_host)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Output.state.in_(sorted(output_states.OPEN)), Output.next_try_at <= now)
    )
    if only is not None:
        query = query.where(Output.id.in_(list(only)))
    query = (
        query.order_by(Output.priority, Output.next_try_at, Output.id)  # most urgent first
        .limit(limit)
        .with_for_update(of=Output, skip_locked=True)
    )
    claimed = session.execute(query).all()
    until = now + timedelta(seconds=lease_seconds)
    groups: dict[tuple[str, str, str | None], list[tuple[tuple[int, int, int], int]]] = {}
    for row, study_uid, version, node_host in claimed:
        if not output_states.move(row, OutputState.in_flight, now=now, next_try_at=until):
            continue
        key = (row.destination, study_uid, node_host)
        groups.setdefault(key, []).append((batch_order(row, version), row.id))
    session.commit()
    return [
        SendBatch(destination, study_uid, [output_id for _, output_id in sorted(items)], host)
        for (destination, study_uid, host), items in groups.items()
    ]


def batch_order(row: Output, version: int) -> tuple[int, int, int]:
    """The order of one study's objects in their association: older draft versions first,
    then by :data:`KIND_ORDER` (the text report before the picture)."""
    return (version, KIND_ORDER.get(row.kind, 9), row.id)


def claimed_before(session: Session, before: datetime) -> list[int]:
    """Outputs claimed for sending (in flight) since before ``before``: candidates for a lost
    send message (the reconciler checks them against the broker's records)."""
    return list(
        session.scalars(
            select(Output.id).where(
                Output.state == OutputState.in_flight, Output.updated_at < before
            )
        )
    )


def release_claims(session: Session, output_ids: Iterable[int], now: datetime) -> int:
    """Give lost sends' outputs back to the outbox, due at once (not counted as a try: the
    message was lost, the destination never saw it). Commits; returns how many."""
    ids = list(output_ids)
    if not ids:
        return 0
    rows = session.scalars(
        select(Output)
        .where(Output.id.in_(ids), Output.state == OutputState.in_flight)
        .with_for_update(skip_locked=True)
    ).all()
    released = sum(
        output_states.move(
            row,
            OutputState.pending,
            now=now,
            expect={OutputState.in_flight},
            next_try_at=now,
            last_status="message lost",
        )
        for row in rows
    )
    session.commit()
    return released


def next_due(session: Session) -> datetime | None:
    """When the next output is due (a retry, or a claim whose lease runs out)."""
    return session.scalar(
        select(func.min(Output.next_try_at)).where(Output.state.in_(sorted(output_states.OPEN)))
    )

"""Resending outputs on an admin's request (``cxrnode resend``, the admin API).

Chosen rows go back to ``pending`` with their tries reset and are due at once; the running
node's scheduler picks them up within a tick. A row whose destination is no longer
configured follows a configured destination at the same address
(:func:`cxrnode.destination.retarget`), so correcting a called AE title and resending is
enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.db import Job, Output, OutputState, Study, utcnow
from cxrnode.destination import retarget
from cxrnode.outputs import states as output_states
from cxrnode.outputs.claim import HL7_KIND
from cxrnode.settings import Settings

__all__ = ["configured_for", "resend"]


def configured_for(kind: str, settings: Settings) -> list[str]:
    """The configured destinations of an output kind: HL7_DESTINATIONS for the HL7 draft,
    DESTINATIONS for the DICOM objects."""
    return list(settings.hl7_destinations if kind == HL7_KIND else settings.destinations)


def resend(
    session: Session,
    settings: Settings,
    *,
    study_uid: str | None = None,
    output_id: int | None = None,
    dead: bool = False,
    now: datetime | None = None,
) -> list[int]:
    """Queue outputs again: one study's current draft, one output, or every dead output.

    Chosen rows go back to ``pending`` with their tries reset and are due at once; the
    running node's scheduler picks them up within a tick. A row whose destination is no
    longer configured follows a configured destination at the same address (see
    :func:`retarget`), so correcting a called AE title and resending is enough. For a study,
    configured destinations that never had a row for its objects get one. Commits.

    Returns
    -------
    list[int]
        Ids of the rows now pending.

    Raises
    ------
    ValueError
        When not exactly one selection is given.
    LookupError
        When the selection names nothing that was recorded.
    """
    if sum(x is not None and x is not False for x in (study_uid, output_id, dead)) != 1:
        raise ValueError("choose exactly one of: a study UID, an output id, or all dead outputs")
    now = now or utcnow()
    if output_id is not None:
        row = session.get(Output, output_id)
        if row is None:
            raise LookupError(f"there is no output {output_id} in the outbox")
        rows = [row]
    elif dead:
        rows = list(session.scalars(select(Output).where(Output.state == OutputState.dead)))
    else:
        rows = _current_draft_rows(session, str(study_uid))
        if not rows:
            raise LookupError(
                f"study {study_uid} has no recorded outputs (unknown study, not reported yet, "
                "or no destination was configured when its draft was made)"
            )
    chosen: dict[int, Output] = {}
    for row in rows:
        target = _retargeted(session, row, configured_for(row.kind, settings))
        chosen[target.id] = target
    if study_uid is not None:
        for row in _missing_destinations(session, rows, settings, now):
            chosen[row.id] = row
    for row in chosen.values():
        output_states.move(row, OutputState.pending, now=now, attempts=0, next_try_at=now)
    session.commit()
    return sorted(chosen)


def _current_draft_rows(session: Session, study_uid: str) -> list[Output]:
    rows = session.execute(
        select(Output, Job.version)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Study.study_instance_uid == study_uid)
    ).all()
    if not rows:
        return []
    latest = max(version for _, version in rows)
    return [row for row, version in rows if version == latest]


def _retargeted(session: Session, row: Output, configured: Sequence[str]) -> Output:
    target = retarget(row.destination, configured)
    if target == row.destination:
        return row
    twin = session.scalars(
        select(Output).where(
            Output.job_id == row.job_id, Output.kind == row.kind, Output.destination == target
        )
    ).first()
    if twin is not None:  # the object already has a row for the corrected destination
        return twin
    row.last_error = f"was addressed to {row.destination}: {row.last_error or ''}".rstrip(": ")
    row.destination = target
    return row


def _missing_destinations(
    session: Session, rows: Sequence[Output], settings: Settings, now: datetime
) -> list[Output]:
    added = []
    objects = {(row.job_id, row.kind): row for row in rows}
    for (job_id, kind), template in objects.items():
        have = set(
            session.scalars(
                select(Output.destination).where(Output.job_id == job_id, Output.kind == kind)
            )
        )
        for destination in configured_for(kind, settings):
            if destination in have:
                continue
            row = Output.pending(
                job_id=job_id,
                kind=kind,
                destination=destination,
                sop_class_uid=template.sop_class_uid,
                sop_instance_uid=template.sop_instance_uid,
                path=template.path,
                now=now,
            )
            session.add(row)
            added.append(row)
    session.flush()
    return added

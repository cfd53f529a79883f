"""Urgent drafts waiting for a person: the dashboard's "Urgent" panel, its acknowledgement,
and what ``/metrics`` says about them.

Triage records an :class:`~cxrnode.db.UrgentDraft` with the draft's outputs; it stays listed
until an operator acknowledges it (who and when are recorded: the acknowledgement is the
node's proof that a person saw the alert). A newer draft of the same study that is not urgent
does not clear it: only a person does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import Study, UrgentDraft, utcnow

__all__ = ["UrgentEntry", "acknowledge", "unacknowledged", "unacknowledged_summary"]


@dataclass(frozen=True)
class UrgentEntry:
    """One unacknowledged urgent draft as the panel lists it."""

    id: int
    study_instance_uid: str
    priority: str
    suspected: tuple[str, ...]
    created_at: datetime
    age_seconds: float

    @property
    def label(self) -> str:
        return "Suspected " + ", ".join(name.replace("_", " ") for name in self.suspected)


def unacknowledged(session: Session, now: datetime | None = None) -> list[UrgentEntry]:
    """Every urgent draft nobody acknowledged yet: stat before ASAP, oldest first."""
    now = now or utcnow()
    rows = session.execute(
        select(UrgentDraft, Study.study_instance_uid)
        .join(Study, UrgentDraft.study_id == Study.id)
        .where(UrgentDraft.acknowledged_at.is_(None))
        .order_by(UrgentDraft.priority.desc(), UrgentDraft.created_at)  # "stat" > "asap"
    ).all()
    return [
        UrgentEntry(
            id=row.id,
            study_instance_uid=uid,
            priority=row.priority,
            suspected=tuple(s for s in row.suspected.split(",") if s),
            created_at=row.created_at,
            age_seconds=max(0.0, (now - row.created_at).total_seconds()),
        )
        for row, uid in rows
    ]


def acknowledge(session: Session, urgent_id: int, who: str, now: datetime | None = None) -> bool:
    """Record that ``who`` acknowledged urgent draft ``urgent_id``; commits.

    Returns False when it was already acknowledged (the first acknowledgement stands).

    Raises
    ------
    LookupError
        When there is no such urgent draft.
    """
    row = session.get(UrgentDraft, urgent_id, with_for_update=True)
    if row is None:
        session.rollback()
        raise LookupError(f"no urgent draft {urgent_id}")
    if row.acknowledged_at is not None:
        session.rollback()
        return False
    row.acknowledged_at = now or utcnow()
    row.acknowledged_by = who[:200]
    session.commit()
    return True


def unacknowledged_summary(session: Session, now: datetime | None = None) -> tuple[int, float]:
    """(how many urgent drafts wait for acknowledgement, age in seconds of the oldest; 0: none)."""
    now = now or utcnow()
    count, oldest = session.execute(
        select(func.count(UrgentDraft.id), func.min(UrgentDraft.created_at)).where(
            UrgentDraft.acknowledged_at.is_(None)
        )
    ).one()
    return int(count), 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())

"""The outbox row's state machine: one table of allowed moves, and every write checked.

::

    pending ──claim──► in_flight ──► delivered | delivered_warning | dead
       ▲                 │   │
       └─ retry/release ─┘   └─► in_flight (its lease ran out: claimed again)

    pending | in_flight ──► superseded            (a newer draft of the study was built)
    any state ──► pending                         (an admin's resend; tries start again)

- ``pending``: due at ``next_try_at`` (a first try, or a retry after a failed one).
- ``in_flight``: claimed by :func:`cxrnode.outputs.claim.due_outputs` for one send message;
  ``next_try_at`` is then the end of the claim's lease. A lost message is found by the
  reconciler (the row is given back, ``pending``), or, at the latest, when the lease ends.
- ``delivered`` / ``delivered_warning`` / ``dead`` / ``superseded`` end it, until a resend.

Every change goes through :func:`move`, which checks the move against :data:`ALLOWED` and
against the state the caller's decision was based on (``expect``): the caller reads the row
locked (``SELECT … FOR UPDATE``; SQLite has one writer), so this is a compare-and-set. A
refused write changes nothing and is logged once: a duplicate send message, an outcome
arriving after an admin's resend, a claim racing another scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime
from typing import Any

from cxrnode.db import Output, OutputState

__all__ = ["ALLOWED", "OPEN", "move"]

log = logging.getLogger(__name__)

O = OutputState  # noqa: E741 (the table reads as a table)

#: States in which a row still waits to reach its destination.
OPEN = frozenset({O.pending, O.in_flight})

#: Every allowed move (from, to). Nothing else is ever written.
ALLOWED: frozenset[tuple[OutputState, OutputState]] = frozenset(
    {
        (O.pending, O.in_flight),  # claimed for a send message
        (O.in_flight, O.in_flight),  # claimed again once its lease ran out (message lost)
        (O.in_flight, O.delivered),
        (O.in_flight, O.delivered_warning),
        (O.in_flight, O.dead),  # a permanent failure, or out of tries
        (O.in_flight, O.pending),  # a failed try to be retried, or a lost message given back
        (O.pending, O.superseded),  # a newer draft was built before this one was sent
        (O.in_flight, O.superseded),
        *((state, O.pending) for state in OutputState),  # an admin's resend
    }
)


def move(
    row: Output,
    to: OutputState,
    *,
    now: datetime,
    expect: Collection[OutputState] | None = None,
    **values: Any,
) -> bool:
    """Move ``row`` (read locked by the caller) to ``to`` and set ``values`` on it, if
    :data:`ALLOWED` permits the move and the row is still in one of the ``expect`` states.

    Returns False, logging one line, when the write is refused; the row is then unchanged.
    Nothing is committed here: the caller commits its transaction.
    """
    current = OutputState(row.state)
    if expect is not None and current not in expect:
        log.info(
            "output %d: %s -> %s refused: it is %s now (expected %s)",
            row.id, current.value, to.value, current.value,
            "/".join(sorted(s.value for s in expect)),
        )  # fmt: skip
        return False
    if (current, to) not in ALLOWED:
        log.warning(
            "output %d: %s -> %s refused (not an allowed move)", row.id, current.value, to.value
        )
        return False
    row.state = to
    row.updated_at = now
    for name, value in values.items():
        setattr(row, name, value)
    return True

"""The node-wide association cap, shared by the listener processes.

Each listener process serves its own associations (several processes share the port with
SO_REUSEPORT), so pynetdicom's per-process ``maximum_associations`` cannot enforce a cap for
the node: with a cap of 4 split over two processes, one process could refuse while the other
was idle. The supervisor instead creates one :class:`AssociationCap` before it spawns the
listeners and hands it to each: a shared array with one counter per listener process,
guarded by one cross-process lock.

One counter per process rather than one for the node, so that a listener killed with its
associations open (kill -9, an OOM kill) does not leak slots for ever: the supervisor that
restarts it zeroes its counter (:meth:`reset`) first; its connections died with it.

A slot is taken in the EVT_REQUESTED handler (before negotiation, so a refusal is an
A-ASSOCIATE-RJ) and given back when the association's thread has ended
(:class:`SlotReleasingHandler`), whatever way it ended: release, abort, timeout or reject.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from cxrnode.compat.pynetdicom import TrackingRequestHandler, transport_closed, wake_acceptor

__all__ = ["AssociationCap", "SlotReleasingHandler", "give_back", "releasing"]


class AssociationCap:
    """At most ``limit`` associations open at once over ``processes`` listener processes."""

    def __init__(self, limit: int, processes: int, context: Any = None) -> None:
        context = context or multiprocessing.get_context("spawn")
        self.limit = limit
        self.counts = context.Array("i", max(1, processes))  # with a cross-process lock

    def try_acquire(self, index: int) -> bool:
        """Take a slot for listener ``index``; False when the node is at its cap."""
        with self.counts.get_lock():
            if sum(self.counts) >= self.limit:
                return False
            self.counts[index] += 1
            return True

    def release(self, index: int) -> None:
        with self.counts.get_lock():
            if self.counts[index] > 0:
                self.counts[index] -= 1

    def reset(self, index: int) -> None:
        """Forget the slots of listener ``index`` (its process is gone, and its connections)."""
        with self.counts.get_lock():
            self.counts[index] = 0

    def open(self) -> int:
        """Associations open now, node-wide."""
        with self.counts.get_lock():
            return sum(self.counts)


#: Attribute set on an association that holds a slot: the (cap, index) to give it back to.
SLOT_ATTRIBUTE = "cxrnode_slot"


def give_back(assoc: Any) -> None:
    """Return the slot ``assoc`` holds, once (EVT_RELEASED/EVT_ABORTED, and the thread's end
    as the fallback: a peer that reconnects right after its release must find it free)."""
    slot = getattr(assoc, SLOT_ATTRIBUTE, None)
    if slot is not None:
        setattr(assoc, SLOT_ATTRIBUTE, None)
        cap, index = slot
        cap.release(index)


def releasing(base: type[TrackingRequestHandler]) -> type[TrackingRequestHandler]:
    """``base`` with :class:`SlotReleasingHandler`'s behaviour (tuned or stock handler)."""
    return type(f"SlotReleasing{base.__name__}", (SlotReleasingHandler, base), {})


class SlotReleasingHandler(TrackingRequestHandler):
    """Waits in the server's per-connection thread until the association's own thread ends,
    then gives back the slot it took (if any). pynetdicom's ``handle`` starts the association
    thread and returns; waiting here costs one parked thread per association."""

    def handle(self) -> None:
        try:
            super().handle()
            if self.cxrnode_assoc is not None:
                _join(self.cxrnode_assoc)
        finally:
            give_back(self.cxrnode_assoc)


#: Seconds between looks at a waiting association for a peer that has already gone.
CLOSED_CHECK_SECONDS = 0.5


def closed_before_request(assoc: Any) -> bool:
    """The peer connected and closed without sending an A-ASSOCIATE-RQ (a TCP health probe,
    a port scan). pynetdicom would keep such an association, and its slot, until the ACSE
    timeout."""
    if assoc.is_established or assoc.is_released or assoc.is_aborted or assoc.is_rejected:
        return False
    return transport_closed(assoc)


def _join(assoc: Any) -> None:
    woken = False
    while assoc.is_alive():
        assoc.join(CLOSED_CHECK_SECONDS)
        if not woken and assoc.is_alive() and closed_before_request(assoc):
            wake_acceptor(assoc)
            woken = True

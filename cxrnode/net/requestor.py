"""Asking a peer for an association, with the peer's rejection never lost.

pynetdicom's requestor has a race on a fast A-ASSOCIATE-RJ: its DUL thread reads the RJ,
hands it to the ACSE and closes the socket (PS3.8 action AE-4) while the ACSE thread has not
yet checked that the connection opened. On a loaded machine the ACSE thread then finds the
socket closed, treats the request as never connected and aborts, so ``is_rejected`` stays
False and the peer's reason is gone. The node would then read a permanent rejection (a wrong
AE title in DESTINATIONS) as "cannot connect" and retry it for ever.

:func:`associate` watches the PDUs received and, when an RJ arrived but pynetdicom lost it,
restores what its ACSE would have recorded (:func:`cxrnode.compat.pynetdicom.mark_rejected`).
"""

from __future__ import annotations

from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from cxrnode.compat.pynetdicom import mark_rejected

__all__ = ["associate"]


def associate(ae: Any, host: str, port: int, **kwargs: Any) -> Any:
    """``ae.associate(host, port, **kwargs)``; a rejection is always reported as one."""
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    handlers = list(kwargs.pop("evt_handlers", None) or [])
    handlers.append((evt.EVT_PDU_RECV, on_pdu))
    assoc = ae.associate(host, port, evt_handlers=handlers, **kwargs)
    if rejections and not assoc.is_established and not assoc.is_rejected:
        mark_rejected(assoc, rejections[0])
    return assoc

"""Every use of pynetdicom's internals, in one place, checked against the installed release.

The node needs a few things pynetdicom does not offer publicly; each is written here once,
and :func:`problems` says, at start-up, whether the installed pynetdicom still has what they
rely on (`cxrnode serve` refuses to start otherwise, saying what to install). Nothing else in
the node touches a private attribute of pynetdicom (``tests/node/test_compat_boundary.py``
walks the source to prove it).

Required (the node cannot run without them; :func:`problems` checks each):

- the association a ``RequestHandler`` creates (``RequestHandler._create_association``): the
  association cap (:mod:`cxrnode.net.cap`) gives back its slot when that association's
  thread ends, and wakes an acceptor whose peer left before sending its request
  (:func:`wake_acceptor`: an empty message on ``DULServiceProvider.to_user_queue``);
- a rejection pynetdicom's requestor lost to its RJ race (:func:`mark_rejected`, used by
  :mod:`cxrnode.net.requestor`): the acceptor's primitive and ``is_rejected``/``is_aborted``;
- a rejection sent from the EVT_REQUESTED handler (:func:`reject`): ``is_rejected`` and the
  EVT_REJECTED event, as pynetdicom's own rejections do;
- the listener's receive configuration (:func:`configure_receive`): ``_config``'s chunked
  receive into files and its per-PDU log handlers.

Optional: the receive tuning below (``RECEIVE_TUNING``). When its internals are missing the
listener runs stock pynetdicom, slower on large images, the same behaviour otherwise.

Receive tuning: whole-PDU socket reads, a DUL loop that waits in ``select``, and write-behind
of the received file. What changes, and why (bench/ingest.py measures it on 10 MB radiographs):

- **Whole-PDU reads.** Stock ``AssociationSocket.recv`` reads 4 KiB at a time and appends
  each piece to a ``bytearray``: about 2,500 calls and copies for a 10 MB image.
  :class:`TunedSocket` fills one preallocated buffer with ``recv_into`` (growing it by at most
  :data:`RECV_RESERVE_BYTES` as data actually arrives, since a PDU header may claim up to
  4 GiB).
- **Waiting, not polling.** The DUL thread of each association polls its socket with a zero
  ``select`` timeout and sleeps 1 ms (``DULServiceProvider._run_loop_delay``) when there is
  nothing. :attr:`TunedSocket.ready` waits in ``select`` for up to :data:`DUL_WAIT_SECONDS`
  instead, so data is seen the moment it arrives, and the loop's own sleep is set to zero.
- **Write-behind.** pynetdicom's chunked receive writes each fragment into a temporary file
  and flushes it; the handler then fsyncs the whole file before it answers, so the disk only
  starts writing once the last byte has arrived. :class:`WritebackFile` asks the kernel to
  start writing every :data:`WRITEBACK_BYTES` as they arrive (``sync_file_range`` with
  ``SYNC_FILE_RANGE_WRITE``: it starts the writeback and does not wait for it), so receiving
  and writing overlap and the final fsync waits for the tail only. Durability is unchanged:
  the fsync still decides.

Upstream-able part: the first two changes fit pynetdicom itself: ``recv`` could use
``recv_into`` into a buffer sized from the PDU length (bounded as here), and ``ready`` could
take a timeout so that ``DULServiceProvider.run_reactor`` blocks in ``select`` instead of
sleeping. Neither changes the
protocol state machine. Until then, this module applies them to the sockets of the listener's
own associations only, by giving pynetdicom's freshly built socket object this subclass (which
adds no state): the constructor cannot simply be called twice, as it queues the
transport-connection event.

Internals the tuning uses (checked by :func:`tuning_problem`): ``AssociationSocket.socket``, ``._is_connected``,
``.event_queue`` and the event name ``"Evt17"`` (transport connection closed, PS3.8 9.2);
``RequestHandler._create_association``; ``DULServiceProvider._run_loop_delay``;
``pynetdicom.dimse_messages.NamedTemporaryFile`` (the chunked receive's file, replaced by
:func:`writeback_temporary_file`, which returns the same object with its ``file`` wrapped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import select
import ssl
import tempfile
import time
from typing import Any

import pynetdicom
from pynetdicom import _config, dimse_messages, evt
from pynetdicom.association import Association, ServiceUser
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

__all__ = [
    "DUL_WAIT_SECONDS",
    "RECV_RESERVE_BYTES",
    "TESTED_VERSIONS",
    "TrackingRequestHandler",
    "TunedRequestHandler",
    "TunedSocket",
    "WRITEBACK_BYTES",
    "WritebackFile",
    "configure_receive",
    "mark_rejected",
    "problems",
    "reject",
    "request_handler",
    "transport_closed",
    "tuning_problem",
    "wake_acceptor",
    "writeback_temporary_file",
]

log = logging.getLogger(__name__)

#: pynetdicom releases these uses were written and tested against (pyproject pins one).
TESTED_VERSIONS = frozenset({"3.0.4"})

#: What to do when the installed pynetdicom lacks what the node needs.
REMEDY = (
    "install a tested release (pip install 'pynetdicom==3.0.4', the version pyproject.toml "
    "pins), or adapt cxrnode/compat/pynetdicom.py to the new one"
)


# ------------------------------------------------------------------ required internals


class TrackingRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler that keeps the association it creates
    (``cxrnode_assoc``), so a subclass can wait for its thread after ``handle`` returns."""

    cxrnode_assoc: Association | None = None

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        self.cxrnode_assoc = assoc
        return assoc


def wake_acceptor(assoc: Association) -> None:
    """Wake an acceptor's reactor waiting for an A-ASSOCIATE-RQ: an empty message on its
    queue reads as its ACSE timeout, after which pynetdicom ends the association."""
    assoc.dul.to_user_queue.put(None)


def transport_closed(assoc: Association) -> bool:
    """Whether the association's TCP socket has been closed (by the peer or the DUL)."""
    transport = getattr(assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    return sock is not None and sock.fileno() == -1


def mark_rejected(assoc: Association, rejection: Any) -> None:
    """Record on a requestor's ``assoc`` the A-ASSOCIATE-RJ PDU ``rejection`` that
    pynetdicom's ACSE lost (what its ACSE would have recorded had it seen it)."""
    acceptor: ServiceUser = assoc.acceptor
    acceptor.primitive = rejection.to_primitive()
    assoc.is_aborted = False
    assoc.is_rejected = True


def reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Send A-ASSOCIATE-RJ from an EVT_REQUESTED handler and let the DUL flush it before the
    socket closes (as pynetdicom does for its own rejections)."""
    assoc.acse.send_reject(result, source, diagnostic)
    # send_reject does not mark the association: without this pynetdicom goes on, after the
    # EVT_REQUESTED handler, to negotiate it (logs "Accepting Association", queues an
    # A-ASSOCIATE-AC on the stopped DUL and flags it established)
    assoc.is_rejected = True
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()  # returns once the peer closed the connection (or ARTIM expired)


def configure_receive(*, log_pdus: bool) -> None:
    """A listener process's pynetdicom configuration: C-STORE datasets received straight into
    files in ``tempfile.tempdir`` (never assembled in memory), and pynetdicom's per-PDU log
    records only when ``log_pdus`` (80 per 10 MB image; the node logs associations itself)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    if not log_pdus:
        _config.LOG_HANDLER_LEVEL = "none"


def _missing(owner: Any, names: tuple[str, ...]) -> list[str]:
    label = getattr(owner, "__name__", str(owner))
    return [f"{label}.{name}" for name in names if not hasattr(owner, name)]


def _not_assigned(owner: type, names: tuple[str, ...]) -> list[str]:
    """Instance attributes: looked for among the names the constructor assigns."""
    assigned = set(owner.__init__.__code__.co_names)
    return [f"{owner.__name__}.{name}" for name in names if name not in assigned]


def problems() -> list[str]:
    """What the installed pynetdicom lacks of the internals the node requires (empty: none)."""
    found = _missing(RequestHandler, ("_create_association",))
    found += _missing(_config, ("STORE_RECV_CHUNKED_DATASET", "LOG_HANDLER_LEVEL"))
    found += _not_assigned(DULServiceProvider, ("to_user_queue", "socket"))
    found += _not_assigned(AssociationSocket, ("socket",))
    found += _not_assigned(ServiceUser, ("primitive",))
    found += _not_assigned(Association, ("is_rejected", "is_aborted", "acse"))
    found += _missing(Association, ("kill",))
    return found


def startup_problem() -> str | None:
    """One line for the operator when the node cannot run on the installed pynetdicom."""
    version = getattr(pynetdicom, "__version__", "?")
    missing = problems()
    if not missing:
        return None
    return f"pynetdicom {version} lacks {', '.join(missing)}, which the node needs: {REMEDY}"


# ------------------------------------------------------------------ optional receive tuning

#: Longest wait of one DUL loop pass for incoming data; it also bounds how long an outgoing
#: PDU (a C-STORE response) waits, as pynetdicom's 1 ms sleep did.
DUL_WAIT_SECONDS = 0.001

#: Most memory one PDU read reserves ahead of the bytes that actually arrived.
RECV_RESERVE_BYTES = 4 * 1024 * 1024

_TRANSPORT_CLOSED = "Evt17"

#: Bytes received between two requests to start writing them to disk.
WRITEBACK_BYTES = 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class WritebackFile:
    """A buffered file being written front to back whose ``flush`` also starts the kernel
    writing what has arrived, every :data:`WRITEBACK_BYTES` (never waits for the disk)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._fd = raw.fileno()
        self._started = 0

    def flush(self) -> None:
        self._raw.flush()
        end = self._raw.tell()
        if _sync_file_range is not None and end - self._started >= WRITEBACK_BYTES:
            _sync_file_range(self._fd, self._started, end - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def writeback_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """``tempfile.NamedTemporaryFile`` whose writes go through a :class:`WritebackFile`."""
    handle = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 (pynetdicom closes it)
    handle.file = WritebackFile(handle.file)
    return handle


class TunedSocket(AssociationSocket):
    """pynetdicom's association socket with whole-PDU reads and a waiting ``ready``."""

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        buffer = bytearray(min(nr_bytes, RECV_RESERVE_BYTES))
        read = 0
        while read < nr_bytes:
            if read == len(buffer):
                buffer.extend(bytes(min(nr_bytes - read, RECV_RESERVE_BYTES)))
            with memoryview(buffer) as view:
                count = self.socket.recv_into(view[read:])
            if not count:  # connection closed: the caller checks the length
                del buffer[read:]
                break
            read += count
        return buffer

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(DUL_WAIT_SECONDS)  # the DUL loop no longer sleeps by itself
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes already buffered, invisible to select
        try:
            readable, _, _ = select.select([sock], [], [], DUL_WAIT_SECONDS)
        except (OSError, ValueError):
            self.event_queue.put(_TRANSPORT_CLOSED)
            return False
        return bool(readable)


class TunedRequestHandler(TrackingRequestHandler):
    """Gives each accepted association a :class:`TunedSocket` and a loop without sleeps."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = TunedSocket
        assoc.dul._run_loop_delay = 0
        return assoc


def tuning_problem() -> str | None:
    """Why the receive tuning cannot be applied to the installed pynetdicom (None: it can)."""
    version = getattr(pynetdicom, "__version__", "?")
    if version not in TESTED_VERSIONS:
        return f"pynetdicom {version} is not one of the tested releases {sorted(TESTED_VERSIONS)}"
    missing = _missing(AssociationSocket, ("recv", "ready"))
    missing += _missing(dimse_messages, ("NamedTemporaryFile",))
    missing += _not_assigned(AssociationSocket, ("socket", "_is_connected", "event_queue"))
    missing += _not_assigned(DULServiceProvider, ("_run_loop_delay",))
    if missing:
        return f"pynetdicom {version} lacks {', '.join(missing)}"
    return None


def request_handler(enabled: bool) -> type[TrackingRequestHandler]:
    """The request handler class the listener should use: tuned when ``enabled`` and the
    installed pynetdicom passes :func:`tuning_problem`, else pynetdicom's own behaviour
    (with one log line)."""
    if not enabled:
        return TrackingRequestHandler
    problem = tuning_problem()
    if problem:
        log.warning("receive tuning off: %s; running stock pynetdicom", problem)
        return TrackingRequestHandler
    dimse_messages.NamedTemporaryFile = writeback_temporary_file  # this listener process only
    return TunedRequestHandler

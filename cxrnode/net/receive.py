"""Receive tuning for pynetdicom: whole-PDU socket reads, a DUL loop that waits in ``select``,
and write-behind of the received file.

This is the only module that reaches into pynetdicom's internals, and it does so only after
:func:`check` has confirmed that the internals it relies on are there. With
``RECEIVE_TUNING=false``, or when the check fails (a pynetdicom upgrade moved something), the
listener runs stock pynetdicom: slower on large images, the same behaviour otherwise.

What changes, and why (bench/ingest.py measures it on 10 MB radiographs):

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

Internals used (checked by :func:`check`): ``AssociationSocket.socket``, ``._is_connected``,
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
from pynetdicom import dimse_messages
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

__all__ = [
    "DUL_WAIT_SECONDS",
    "RECV_RESERVE_BYTES",
    "TESTED_VERSIONS",
    "TunedRequestHandler",
    "TunedSocket",
    "WRITEBACK_BYTES",
    "WritebackFile",
    "check",
    "request_handler",
    "writeback_temporary_file",
]

log = logging.getLogger(__name__)

#: pynetdicom releases this tuning was written and tested against.
TESTED_VERSIONS = frozenset({"3.0.4"})

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


class TunedRequestHandler(RequestHandler):
    """Gives each accepted association a :class:`TunedSocket` and a loop without sleeps."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = TunedSocket
        assoc.dul._run_loop_delay = 0
        return assoc


def check() -> str | None:
    """Why the tuning cannot be applied to the installed pynetdicom, or None when it can."""
    version = getattr(pynetdicom, "__version__", "?")
    if version not in TESTED_VERSIONS:
        return f"pynetdicom {version} is not one of the tested releases {sorted(TESTED_VERSIONS)}"
    missing = [
        name
        for owner, name in (
            (RequestHandler, "_create_association"),
            (AssociationSocket, "recv"),
            (AssociationSocket, "ready"),
            (dimse_messages, "NamedTemporaryFile"),
        )
        if not hasattr(owner, name)
    ]
    # instance attributes: look for their assignment in the constructors
    for owner, names in (
        (AssociationSocket, ("socket", "_is_connected", "event_queue")),
        (DULServiceProvider, ("_run_loop_delay",)),
    ):
        assigned = set(owner.__init__.__code__.co_names)
        missing += [f"{owner.__name__}.{name}" for name in names if name not in assigned]
    if missing:
        return f"pynetdicom {version} lacks {', '.join(missing)}"
    return None


def request_handler(enabled: bool) -> type[RequestHandler]:
    """The request handler class the listener should use: tuned when ``enabled`` and the
    installed pynetdicom passes :func:`check`, else pynetdicom's own (with one log line)."""
    if not enabled:
        return RequestHandler
    problem = check()
    if problem:
        log.warning("receive tuning off: %s; running stock pynetdicom", problem)
        return RequestHandler
    dimse_messages.NamedTemporaryFile = writeback_temporary_file  # this listener process only
    return TunedRequestHandler

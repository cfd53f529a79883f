"""The DICOM listener: C-ECHO and C-STORE for CR, DX and chest Secondary Captures, as a thin
adapter over ``ingest``
(and C-STORE of radiologists' SR reports, handed to :mod:`cxrnode.ingest.reports`).

Several listener processes share the port with SO_REUSEPORT, so associations spread over
cores (one Python process does not scale past one core). Each process runs pynetdicom's
threaded server; access control happens in the EVT_REQUESTED handler, before negotiation.

The receive path is tuned for 10 MB radiographs (see bench/ingest.py):

- pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``) writes each dataset to a file
  in DATA_DIR/tmp as its fragments arrive; the C-STORE handler fsyncs that file and links it
  into place (:meth:`cxrnode.ingest.receive.Ingest.receive_file`), so the bytes are never assembled
  in memory nor written twice;
- :mod:`cxrnode.compat.pynetdicom` reads a PDU with a few ``recv_into`` calls instead of
  pynetdicom's 4 KiB ``recv`` loop, and waits for data in ``select`` instead of sleeping
  between polls (the one place that touches pynetdicom internals; ``RECEIVE_TUNING=false``
  runs stock pynetdicom).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import update

from cxrnode.audit import dicom as audit_dicom
from cxrnode.compat.pynetdicom import configure_receive, reject, request_handler
from cxrnode.db import AssociationLog, make_engine, make_sessionmaker, utcnow
from cxrnode.ingest.receive import SUCCESS, Ingest
from cxrnode.ingest.reports import REPORT_SOP_CLASSES, ReportIngest
from cxrnode.ingest.storage import clean_tmp
from cxrnode.jobs.broker import Waker
from cxrnode.logs import setup_logging
from cxrnode.net.cap import SLOT_ATTRIBUTE, AssociationCap, give_back, releasing
from cxrnode.net.metrics import observe_store
from cxrnode.process import become
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    # digitised films and re-wrapped radiographs; ingest refuses (0x0122) an SC whose header
    # does not say chest radiograph (cxrnode.ingest.header.secondary_capture_refusal)
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

#: Image transfer syntaxes we accept, in order of preference. pynetdicom's acceptor takes the
#: first of OUR list that the caller proposes, so lossless compressed syntaxes come first (a
#: caller proposing its file's own syntax beside uncompressed ones then sends the file as it
#: is, without transcoding), uncompressed next, lossy last. Only syntaxes the prepare step can
#: decode are offered (no JPEG XL, no video), so a PACS falls back to one we can read.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.1",  # Explicit VR little endian
    "1.2.840.10008.1.2",  # Implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # Deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # Explicit VR big endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)

#: Radiologists' reports (Basic Text, Enhanced, Comprehensive, Comprehensive 3D SR) come
#: back for the agreement monitor (cxrnode.ingest.reports); SRs travel uncompressed.
REPORT_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR little endian
    "1.2.840.10008.1.2",  # Implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # Deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # Explicit VR big endian
)

# A-ASSOCIATE-RJ parameters (PS3.8 7.1.1.9)
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_USER, SOURCE_PROVIDER_PRESENTATION = 0x01, 0x03
DIAG_CALLING_AET_NOT_RECOGNISED = 0x03
DIAG_TEMPORARY_CONGESTION = 0x01
DIAG_LOCAL_LIMIT_EXCEEDED = 0x02


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT, so several processes share a port."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    for sop_class in REPORT_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(REPORT_TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.maximum_pdu_size = settings.max_pdu_size
    # The node-wide cap (cxrnode.net.cap) decides; pynetdicom's own per-process count is
    # only a backstop that must never refuse first. It counts association threads, and a
    # released association's thread lives on for a moment after its slot is given back, so
    # at the cap it would refuse a peer the node has room for (with the same 2/3/2 reason,
    # unlogged): twice the cap leaves it room.
    ae.maximum_associations = 2 * settings.max_associations + PROBE_THREADS
    ae.require_called_aet = settings.require_called_aet
    ae.network_timeout = settings.network_timeout
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.network_timeout
    return ae


class AuditedTLSContext(ssl.SSLContext):
    """A server context whose failed handshakes (no or a wrong client certificate, a plain
    DICOM peer on the TLS port) are Security Alerts in the audit trail. pynetdicom wraps
    each accepted socket with ``wrap_socket`` (the handshake happens there)."""

    audit_settings: Settings | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        try:
            return super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as exc:
            if self.audit_settings is not None:
                try:
                    host = sock.getpeername()[0]
                except OSError:
                    host = None
                audit_dicom.tls_refused(self.audit_settings, host, exc)
            raise


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Server-side TLS; with a client CA the caller must present a certificate (mutual TLS)."""
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("DICOM TLS needs both TLS_CERT and TLS_KEY")
    context = AuditedTLSContext(ssl.PROTOCOL_TLS_SERVER)
    context.audit_settings = settings
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_client_ca:
        context.load_verify_locations(cafile=str(settings.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Handlers:
    """Event handlers of one listener process."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        sessions: Any,
        waker: Waker | None = None,
        reports: ReportIngest | None = None,
        cap: AssociationCap | None = None,
        index: int = 0,
    ) -> None:
        self.settings = settings
        self.cap = cap or AssociationCap(settings.max_associations, 1)
        self.index = index
        self.ingest = ingest
        self.sessions = sessions
        self.waker = waker
        self.reports = reports or ReportIngest(settings, sessions)
        self._stats: dict[int, list[int]] = {}  # association log id -> [instances, bytes]
        self._received: dict[int, list[int]] = {}  # association log id -> instance ids (audit)
        self._lock = threading.Lock()

    def bindings(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACSE_RECV, self.on_acse_received),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
        ]

    def _log_association(self, assoc: Any, accepted: bool, reason: str | None) -> int:
        requestor = assoc.requestor
        with self.sessions() as session:
            row = AssociationLog(
                calling_aet=str(requestor.primitive.calling_ae_title).strip(),
                called_aet=str(assoc.acceptor.ae_title).strip(),
                peer_host=requestor.address,
                accepted=accepted,
                reason=reason,
            )
            session.add(row)
            session.commit()
            return row.id

    def on_requested(self, event: Any) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        host = assoc.requestor.address
        if not self.settings.calling_aet_allowed(calling, host):
            log.warning("association from %s@%s refused: calling AE not allowed", calling, host)
            self._log_association(assoc, False, "calling AE title not allowed")
            audit_dicom.association_refused(self.settings, calling, host, "calling AE not allowed")
            reject(assoc, REJECTED_PERMANENT, SOURCE_USER, DIAG_CALLING_AET_NOT_RECOGNISED)
            return
        if self.ingest.disk_low():
            log.warning("association from %s refused: free disk below reserve", calling)
            self._log_association(assoc, False, "free disk space below the reserve")
            reject(
                assoc, REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, DIAG_TEMPORARY_CONGESTION
            )
            return
        if not self.cap.try_acquire(self.index):
            log.warning(
                "association from %s@%s refused: %d associations open, the node's cap",
                calling,
                host,
                self.cap.limit,
            )
            self._log_association(assoc, False, "association cap reached (MAX_ASSOCIATIONS)")
            reject(
                assoc, REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, DIAG_LOCAL_LIMIT_EXCEEDED
            )
            return
        setattr(assoc, SLOT_ATTRIBUTE, (self.cap, self.index))  # given back when it ends
        reason = None
        if self.settings.require_called_aet and called != self.settings.ae_title:
            reason = f"called AE title {called!r} is not ours"  # pynetdicom rejects it next
            audit_dicom.association_refused(self.settings, calling, host, reason)
        row_id = self._log_association(assoc, reason is None, reason)
        assoc.cxrnode_log_id = row_id  # type: ignore[attr-defined]
        with self._lock:
            self._stats[row_id] = [0, 0]

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_store(self, event: Any) -> int | Dataset:
        request = event.request
        received = dict(
            transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            calling_aet=str(event.assoc.requestor.ae_title).strip(),
            peer_host=event.assoc.requestor.address,
        )
        # run_listener turns on pynetdicom's chunked receive: the dataset is already a file
        report = received["sop_class_uid"] in REPORT_SOP_CLASSES  # for the monitor
        receiver = self.reports if report else self.ingest
        started = time.perf_counter()
        outcome = receiver.receive_file(Path(event.dataset_path), **received)
        observe_store(
            outcome.status, outcome.duplicate, outcome.size_bytes, time.perf_counter() - started
        )
        if outcome.status == SUCCESS and self.waker is not None and not report:
            self.waker.poke()  # a study's quiet period (re)starts: the scheduler recomputes
        row_id = getattr(event.assoc, "cxrnode_log_id", None)
        if row_id is not None and outcome.status == SUCCESS:
            with self._lock:
                stats = self._stats.setdefault(row_id, [0, 0])
                stats[0] += 1
                stats[1] += outcome.size_bytes
                if outcome.instance_id is not None and not outcome.duplicate:
                    self._received.setdefault(row_id, []).append(outcome.instance_id)
        if outcome.status == SUCCESS or outcome.reason is None:
            return outcome.status
        status = Dataset()
        status.Status = outcome.status
        status.ErrorComment = outcome.reason[:64]
        return status

    def on_acse_received(self, event: Any) -> None:
        """A release request gives its slot back before the reply goes out: a peer that
        reconnects as soon as it reads the reply finds the slot free (EVT_RELEASED comes
        only after the reply, too late on a busy machine)."""
        if isinstance(getattr(event, "primitive", None), A_RELEASE):
            give_back(event.assoc)

    def on_closed(self, event: Any) -> None:
        give_back(event.assoc)  # the peer may reconnect at once: its slot is free now
        # A transfer cut short leaves pynetdicom's partial file in DATA_DIR/tmp; a file
        # untouched for longer than the network timeout belongs to no live association.
        clean_tmp(self.settings.tmp_dir, older_than=2 * self.settings.network_timeout)
        row_id = getattr(event.assoc, "cxrnode_log_id", None)
        if row_id is None:
            return
        with self._lock:
            instances, nbytes = self._stats.pop(row_id, [0, 0])
            received = self._received.pop(row_id, [])
        try:
            with self.sessions() as session:
                session.execute(
                    update(AssociationLog)
                    .where(AssociationLog.id == row_id)
                    .values(ended_at=utcnow(), instances=instances, bytes_received=nbytes)
                )
                session.commit()
        except Exception:  # bookkeeping must never break the association
            log.exception("cannot update association log %s", row_id)
        try:  # after the association: the C-STORE path itself does no audit work
            requestor = event.assoc.requestor
            audit_dicom.received(
                self.settings,
                self.sessions,
                str(requestor.ae_title).strip(),
                requestor.address,
                received,
            )
        except Exception:
            log.exception("cannot write the audit record of association %s", row_id)


#: Room in pynetdicom's own association count for connections that are not associations yet
#: (TCP probes, peers that have not sent their request).
PROBE_THREADS = 8

#: Seconds a stopping listener lets open associations finish before it aborts them. An
#: aborted C-STORE was never acknowledged: the sender keeps the instance and sends it again.
SHUTDOWN_GRACE_SECONDS = 3.0


def finish_associations(servers: list[Any], grace: float) -> None:
    """Wait up to ``grace`` seconds for the servers' associations to end, then abort the rest
    (an idle peer holding an association open would otherwise delay the stop until its
    network timeout)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(s.active_associations for s in servers):
        time.sleep(0.1)
    for server in servers:
        for assoc in server.active_associations:
            log.info("listener stopping: aborting an open association")
            with contextlib.suppress(Exception):
                assoc.abort()


def run_listener(settings: Settings, cap: AssociationCap | None = None, index: int = 0) -> None:
    """Body of listener process ``index``: serve until SIGTERM. ``cap`` is the node-wide
    association cap shared by all listener processes (see :mod:`cxrnode.net.cap`)."""
    become(f"listener {index} ({settings.ae_title})")
    setup_logging(settings.log_level, settings)
    # Receive datasets straight into files in DATA_DIR/tmp, on the file system of their final
    # place, so storing one is fsync + link (cxrnode.ingest.receive.Ingest.receive_file).
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(settings.tmp_dir)
    # pynetdicom's standard event handlers build a log record for every PDU (80 per 10 MB
    # image); keep them for debugging only, as the node logs associations itself.
    configure_receive(log_pdus=settings.log_level.upper() == "DEBUG")
    engine = make_engine(settings.effective_database_url)
    sessions = make_sessionmaker(engine)
    ingest = Ingest(settings, sessions)
    handlers = Handlers(settings, ingest, sessions, Waker(settings), cap=cap, index=index)
    ae = build_ae(settings)
    handler_class = releasing(request_handler(settings.receive_tuning))
    servers = []
    if not settings.tls_only:
        servers.append(
            ae.make_server(
                (settings.dicom_host, settings.dicom_port),
                evt_handlers=handlers.bindings(),
                server_class=ReusePortServer,
                request_handler=handler_class,
            )
        )
    if settings.tls_port:
        servers.append(
            ae.make_server(
                (settings.dicom_host, settings.tls_port),
                evt_handlers=handlers.bindings(),
                ssl_context=tls_context(settings),
                server_class=ReusePortServer,
                request_handler=handler_class,
            )
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # The accept loop wakes every poll interval only to look for a shutdown request: 2 s
    # instead of socketserver's 0.5 keeps an idle listener quiet (a connection still wakes
    # it at once); stopping takes at most that long.
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 2.0}, daemon=True)
        for s in servers
    ]
    for thread in threads:
        thread.start()
    log.info(
        "listener %d serving %s on %s",
        os.getpid(),
        settings.ae_title,
        ", ".join(
            f"port {port}{' (TLS)' if port == settings.tls_port else ''}"
            for port in ([] if settings.tls_only else [settings.dicom_port]) + [settings.tls_port]
            if port
        ),
    )
    stop.wait()
    for server in servers:
        # socketserver's own shutdown: pynetdicom's would look for the server in the AE's
        # list, which make_server does not add it to
        socketserver.BaseServer.shutdown(server)
    finish_associations(servers, SHUTDOWN_GRACE_SECONDS)
    for server in servers:
        server.server_close()
    engine.dispose()

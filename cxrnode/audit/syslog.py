"""Forward the audit files to the site's audit repository: RFC 5424 syslog messages over TLS
with RFC 5425 octet-counting framing (``AUDIT_SYSLOG=tls://host:6514``).

The files are the spool: records are written there first (by whichever process made them)
and this forwarder, one thread of ``cxrnode serve``, sends what lies past its cursor and then
moves the cursor. Clinical work therefore never waits for the repository, and an outage only
delays records: they are sent, in order, when it returns.

**Exactly once.** A record is sent once its predecessors are; the cursor moves after the
batch is written to the TLS connection, and before each batch the connection is checked for
an orderly close by the repository (a collector that stops closes its connections; the
closed connection is replaced, never written to). RFC 5425 has no application-level
acknowledgement, so two windows remain, both narrow and both documented in docs/security.md:
a collector that dies without closing while a batch is in flight (records lost in its
buffers), and a node that dies between sending and moving the cursor (a batch sent again).

Syslog header (RFC 5424, as IHE ATNA asks): PRI 85 (facility 10 security/authorization,
severity 5 notice), the record's EventDateTime as TIMESTAMP, the host name, APP-NAME
``cxrnode``, MSGID ``IHE+RFC-3881``, no structured data, the XML as MSG.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from cxrnode.audit.files import AuditFiles, Cursor
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

PRI = 10 * 8 + 5
BATCH = 200
_WHEN = re.compile(r'EventDateTime="([^"]+)"')


def frame(record: str, hostname: str) -> bytes:
    """One record as an octet-counted RFC 5424 message."""
    match = _WHEN.search(record)
    timestamp = match.group(1) if match else "-"
    message = f"<{PRI}>1 {timestamp} {hostname or '-'} cxrnode - IHE+RFC-3881 - {record}".encode()
    return f"{len(message)} ".encode() + message


def parse_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "tls" or not parts.hostname:
        raise ValueError(f"AUDIT_SYSLOG {url!r}: expected tls://host:port")
    return parts.hostname, parts.port or 6514


class SyslogForwarder:
    """Sends the audit files' records past the cursor to the repository (see module)."""

    def __init__(self, settings: Settings, files: AuditFiles, *, retry_seconds: float = 5.0):
        assert settings.audit_syslog
        self.host, self.port = parse_target(settings.audit_syslog)
        self.files = files
        self.retry_seconds = retry_seconds
        self.hostname = socket.gethostname()
        self.context = ssl.create_default_context(
            cafile=str(settings.audit_syslog_ca) if settings.audit_syslog_ca else None
        )
        if settings.audit_syslog_cert:
            self.context.load_cert_chain(
                str(settings.audit_syslog_cert),
                str(settings.audit_syslog_key) if settings.audit_syslog_key else None,
            )
        self._sock: ssl.SSLSocket | None = None
        self._down_since: float | None = None

    # --------------------------------------------------------------------------- connection
    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and self._peer_closed(self._sock):
            log.info("the audit repository closed the connection; reconnecting")
            self._drop()
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=10)
            try:
                self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        return self._sock

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> bool:
        """A syslog receiver never sends: anything readable is its close (or an alert)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable and not sock.pending():
            return False
        try:
            sock.setblocking(False)
            sock.recv(1)  # b"" (closed) or an unexpected byte: either way, not ours to keep
            return True
        except ssl.SSLWantReadError:
            return False  # TLS bookkeeping (a session ticket), not data
        except (OSError, ssl.SSLError):
            return True
        finally:
            sock.setblocking(True)

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    # --------------------------------------------------------------------------- sending
    def send_pending(self) -> int:
        """Send what lies past the cursor; the number of records sent (0 when the repository
        cannot be reached: they wait on disk)."""
        sent = 0
        while True:
            cursor = self.files.cursor()
            batch = list(self.files.after(cursor, limit=BATCH))
            if not batch:
                return sent
            try:
                sock = self._connection()
                sock.sendall(b"".join(frame(line, self.hostname) for _, line in batch))
            except (OSError, ssl.SSLError) as exc:
                self._drop()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "audit repository %s:%d unreachable (%s); records wait in the audit "
                        "files and are sent when it answers",
                        self.host,
                        self.port,
                        exc.__class__.__name__,
                    )
                return sent
            if self._down_since is not None:
                log.info(
                    "audit repository %s:%d answers again after %.0f s",
                    self.host,
                    self.port,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            last: Cursor = batch[-1][0]
            self.files.save_cursor(last)
            sent += len(batch)

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Forward until ``stop`` is set (polling the files; faster while all is well)."""
        while not stop.is_set():
            try:
                self.send_pending()
            except Exception:
                log.exception("the audit forwarder failed; trying again")
            stop.wait(poll_seconds if self._down_since is None else self.retry_seconds)
        try:
            self.send_pending()
        finally:
            self._drop()

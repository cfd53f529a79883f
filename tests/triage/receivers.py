"""Real receivers for the triage tests: an HTTP server that records webhook calls and an SMTP
server (aiosmtpd) that requires STARTTLS, with a certificate made by openssl for the test."""

from __future__ import annotations

import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from services import free_port


@dataclass
class Hook:
    port: int
    received: list[tuple[dict[str, str], bytes]]


@pytest.fixture
def webhook() -> Iterator[Hook]:
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Hook(server.server_address[1], received)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Mailbox:
    port: int
    ca: Path
    messages: list[tuple[bytes, list[str], bool]]  # (content, recipients, was TLS)


@pytest.fixture
def mailbox(tmp_path: Path) -> Iterator[Mailbox]:
    from aiosmtpd.controller import Controller

    key, cert = tmp_path / "smtp.key", tmp_path / "smtp.pem"
    subprocess.run(
        ["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    messages: list[tuple[bytes, list[str], bool]] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201, N802
            messages.append((envelope.content, list(envelope.rcpt_tos), session.ssl is not None))
            return "250 OK"

    port = free_port()
    controller = Controller(
        Handler(), hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True
    )
    controller.start()
    try:
        yield Mailbox(port, cert, messages)
    finally:
        controller.stop()

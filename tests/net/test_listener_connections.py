"""Connections that never become associations, and associations still open at a stop.

In-process pynetdicom servers with the listener's request handler: a TCP health probe (connect,
close) must not leave an association thread waiting for the ACSE timeout, and a stopping
listener aborts an idle peer's association instead of waiting for it.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler
from services import wait_for

from cxrnode.net.cap import releasing
from cxrnode.net.listener import finish_associations


@pytest.fixture
def server() -> Iterator[object]:
    ae = AE(ae_title="NODE")
    ae.add_supported_context(Verification)
    ae.acse_timeout = 30  # what the listener uses: a probe must not wait for it
    srv = ae.make_server(("127.0.0.1", 0), request_handler=releasing(RequestHandler))

    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield srv
    socketserver.BaseServer.shutdown(srv)  # as the listener does (make_server's is not listed)
    srv.server_close()
    thread.join(5)


def test_a_tcp_probe_ends_its_association_at_once(server) -> None:  # noqa: ANN001
    port = server.server_address[1]
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)):
            pass
    wait_for(
        lambda: not server.active_associations,
        3,
        "a connection closed before A-ASSOCIATE-RQ to lose its association thread",
    )


def test_a_real_association_is_not_cut_short(server) -> None:  # noqa: ANN001
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="NODE")
    assert assoc.is_established
    time.sleep(1.5)  # several looks by the handler
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_a_stopping_listener_aborts_an_idle_association(server) -> None:  # noqa: ANN001
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="NODE")
    assert assoc.is_established
    started = time.monotonic()
    finish_associations([server], grace=0.5)
    assert time.monotonic() - started < 3
    wait_for(lambda: assoc.is_aborted, 3, "the peer to be told the association ended")
    wait_for(lambda: not server.active_associations, 3, "the association threads to end")

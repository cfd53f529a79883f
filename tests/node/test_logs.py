"""Log records as the node's handlers write them: a lost broker is one line, other errors
keep their traceback."""

from __future__ import annotations

import io
import logging
import socket

import pytest
import redis

from cxrnode.logs import _BrokerLossFilter


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def written() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_BrokerLossFilter())
    logger = logging.getLogger("celery.worker")
    saved = logger.handlers[:], logger.propagate, logging.getLogger().level
    logger.handlers[:] = [handler]
    logger.propagate = False
    logging.getLogger().setLevel(logging.INFO)
    yield logger, out
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logging.getLogger().setLevel(saved[2])


def fail_after_lost_broker() -> None:
    """What kombu does when Redis is gone: a real refused connection, then an error of its own
    while cleaning up after it."""
    client = redis.Redis(host="127.0.0.1", port=closed_port(), socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        connection = None
        connection.hostname  # type: ignore[attr-defined]  # noqa: B018


def test_an_error_under_a_lost_broker_connection_is_one_line(written) -> None:
    logger, out = written
    try:
        fail_after_lost_broker()
    except AttributeError as exc:
        logger.critical("Unrecoverable error: %r", exc, exc_info=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, out.getvalue()
    assert lines[0].startswith("CRITICAL celery.worker: Unrecoverable error: AttributeError(")
    assert "(broker connection lost: Error 111 connecting to 127.0.0.1:" in lines[0]


def test_other_errors_keep_their_traceback(written) -> None:
    logger, out = written
    try:
        {}["missing"]
    except KeyError:
        logger.error("Unrecoverable error", exc_info=True)
    assert "Traceback (most recent call last)" in out.getvalue()
    assert "broker connection lost" not in out.getvalue()


def test_at_debug_the_broker_traceback_is_kept(written) -> None:
    logger, out = written
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        fail_after_lost_broker()
    except AttributeError:
        logger.error("Error on stopping Hub", exc_info=True)
    assert "Traceback (most recent call last)" in out.getvalue()
    assert "ConnectionRefusedError" in out.getvalue()  # the chain, cause by cause

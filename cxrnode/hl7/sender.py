"""Sending HL7 drafts over MLLP and reading the receiver's ACK: the outbox's HL7 transport.

One connection per call (the outbox calls once per study and destination), messages in order,
each answered before the next goes. What the answer means for the outbox row:

- MSA-1 ``AA`` (or ``CA``) naming our MSH-10 in MSA-2: delivered;
- ``AE`` (``CE``): the receiver had a problem that may pass: retried with backoff;
- ``AR`` (``CR``): the receiver refuses the message; resending it cannot help: dead letter;
- no connection, no answer within ``SEND_TIMEOUT``, an answer that is not an ACK or names
  another message: retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from hl7.mllp import open_hl7_connection

from cxrnode.hl7.message import decode, sniff_header
from cxrnode.hl7.mllp import STREAM_LIMIT, read_block

__all__ = ["Answer", "classify_ack", "send_messages"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What one message's try came to; ``verdict`` is an outbox verdict name."""

    verdict: str  # "delivered", "retry" or "dead"
    status: str  # "AA", "AE", "AR", "no-connection", "timeout", "bad-ack"
    detail: str | None = None


def _segments(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for segment in text.replace("\n", "\r").split("\r"):
        if len(segment) > 3:
            out.setdefault(segment[:3], segment.split("|"))
    return out


def classify_ack(ack: bytes, control_id: str, destination: str) -> Answer:
    """The outbox's reading of an ACK to the message with MSH-10 ``control_id``."""
    text = decode(ack, sniff_header(decode(ack)).charset)
    segments = _segments(text)
    msa = segments.get("MSA")
    if "MSH" not in segments or msa is None or len(msa) < 3:
        return Answer("retry", "bad-ack", f"{destination} answered something that is not an ACK")
    code = msa[1].strip().upper()
    reason = msa[3].strip() if len(msa) > 3 else ""
    err = segments.get("ERR")
    if err is not None and len(err) > 8 and err[8].strip():
        reason = err[8].strip()
    if msa[2].strip() != control_id:
        return Answer(
            "retry",
            "bad-ack",
            f"{destination} acknowledged message {msa[2].strip()!r}, not {control_id!r}",
        )
    said = f" ({reason})" if reason else ""
    if code in ("AA", "CA"):
        return Answer("delivered", code, None)
    if code in ("AE", "CE"):
        return Answer("retry", code, f"{destination} answered {code}, an error{said}")
    if code in ("AR", "CR"):
        return Answer(
            "dead",
            code,
            f"{destination} rejected the message with {code}{said}; fix the receiver or the "
            "HL7 settings, then `cxrnode resend --dead`",
        )
    return Answer("retry", "bad-ack", f"{destination} answered the unknown code {code!r}")


def _control_id(message: bytes) -> str:
    return sniff_header(decode(message)).control_id


async def _send_all(
    host: str, port: int, messages: Sequence[tuple[int, bytes]], timeout: float
) -> dict[int, Answer]:
    destination = f"mllp://{host}:{port}"
    answers: dict[int, Answer] = {}
    try:
        reader, writer = await asyncio.wait_for(
            open_hl7_connection(host, port, limit=STREAM_LIMIT), timeout
        )
    except (OSError, TimeoutError) as exc:
        failure = Answer("retry", "no-connection", f"cannot connect to {destination}: {exc}")
        return {output_id: failure for output_id, _ in messages}
    try:
        for output_id, message in messages:
            try:
                writer.writeblock(message)
                await asyncio.wait_for(writer.drain(), timeout)
                block = await asyncio.wait_for(read_block(reader, 1024 * 1024, timeout), timeout)
            except (OSError, TimeoutError) as exc:
                answers[output_id] = Answer(
                    "retry", "timeout", f"no ACK from {destination} within {timeout:g} s ({exc!r})"
                )
                break
            if block is None or not block.complete:
                answers[output_id] = Answer(
                    "retry", "no-response", f"{destination} closed the connection without an ACK"
                )
                break
            answers[output_id] = classify_ack(block.data, _control_id(message), destination)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout)
    for output_id, _ in messages:
        answers.setdefault(
            output_id, Answer("retry", "not-sent", "the connection ended before this message")
        )
    return answers


def send_messages(
    host: str, port: int, messages: Sequence[tuple[int, bytes]], *, timeout: float = 30.0
) -> dict[int, Answer]:
    """Send ``(output id, message bytes)`` in order over one MLLP connection; return each
    message's :class:`Answer`. Never raises for what the network or the peer does."""
    return asyncio.run(_send_all(host, port, messages, timeout))

"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol): ``<VT> message <FS><CR>``.

python-hl7's asyncio streams (:mod:`hl7.mllp`) run the connections; :func:`read_block` reads
one frame from such a stream with a size limit of our own. python-hl7's ``readblock`` drops
the start of a frame that outgrows the stream limit, and the rest then reads as a broken
frame; here an oversized message is read to its end, its first bytes kept (enough for the
MSH and so for an ACK that names it), and the next message starts cleanly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["END_BLOCK", "START_BLOCK", "STREAM_LIMIT", "Block", "frame", "read_block"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
#: asyncio stream buffer limit: a frame longer than this is read in pieces
STREAM_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Block:
    """One frame as read: the message bytes (no framing), at most ``max_bytes`` of them.

    ``size`` is the whole message's length; ``oversize`` says ``data`` holds only its start;
    ``framed`` is False when the bytes did not begin with <VT> (the peer does not speak MLLP);
    ``complete`` is False when the connection closed before <FS><CR>.
    """

    data: bytes
    size: int
    oversize: bool = False
    framed: bool = True
    complete: bool = True


def frame(message: bytes) -> bytes:
    """``message`` wrapped for the wire."""
    return START_BLOCK + message + END_BLOCK


async def read_block(
    reader: asyncio.StreamReader, max_bytes: int, timeout: float | None = None
) -> Block | None:
    """Read one frame; ``None`` at a clean end of the connection.

    Waits as long as it takes for the first byte (MLLP connections stay open between
    messages), then at most ``timeout`` seconds between pieces of the frame
    (:class:`TimeoutError` after that).
    """
    first = await reader.read(1)
    if not first:
        return None
    kept = bytearray(first)
    size = 1
    complete = True
    while True:
        try:
            piece = await asyncio.wait_for(reader.readuntil(END_BLOCK), timeout)
        except asyncio.LimitOverrunError as exc:
            piece = await reader.readexactly(exc.consumed)  # already buffered: no wait
            size += len(piece)
            kept += piece[: max(0, max_bytes + len(START_BLOCK) - len(kept))]
            continue
        except asyncio.IncompleteReadError as exc:  # the peer closed mid-frame
            piece, complete = exc.partial, False
        size += len(piece)
        kept += piece[: max(0, max_bytes + len(START_BLOCK) + len(END_BLOCK) - len(kept))]
        break
    raw = bytes(kept).lstrip(b" \t\r\n")  # stray line ends between frames are harmless
    framed = raw.startswith(START_BLOCK)
    body = raw[len(START_BLOCK) :] if framed else raw
    if complete and body.endswith(END_BLOCK):
        body = body[: -len(END_BLOCK)]
    length = size - len(START_BLOCK) - (len(END_BLOCK) if complete else 0)
    oversize = length > max_bytes
    return Block(body[:max_bytes], length, oversize, framed, complete)

"""The MLLP listener: HL7 v2 final reports from a RIS, as a thin adapter over
:class:`cxrnode.hl7.receive.Hl7Receiver`.

It runs on python-hl7's asyncio MLLP server (:func:`hl7.mllp.start_hl7_server`) in the monitor
process (:mod:`cxrnode.monitor.service`) that ``cxrnode serve`` starts when ``HL7_PORT`` is
set. A connection may carry any number of messages, one after the other, each answered with
its ACK before the next is read; connections stay open between messages as RIS interfaces
expect. The database work of a message (store, record, commit) runs in a worker thread, so a
slow commit never stops the other connections. After the ACK is written, the studies the
message matched are scored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from hl7.mllp import start_hl7_server

from cxrnode.hl7.mllp import STREAM_LIMIT, read_block
from cxrnode.hl7.receive import Hl7Receiver, Reception
from cxrnode.settings import Settings

__all__ = ["MllpListener"]

log = logging.getLogger(__name__)


class MllpListener:
    """Serves HL7 over MLLP on ``HL7_HOST:HL7_PORT`` (or ``port``, e.g. 0 in tests)."""

    def __init__(
        self,
        settings: Settings,
        receiver: Hl7Receiver,
        executor: Executor,
        on_recorded: Callable[[Reception], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.receiver = receiver
        self.executor = executor
        self.on_recorded = on_recorded
        self.server: asyncio.Server | None = None

    async def start(self, host: str | None = None, port: int | None = None) -> asyncio.Server:
        self.server = await start_hl7_server(
            self._connection,
            host or self.settings.hl7_host,
            self.settings.hl7_port if port is None else port,
            limit=STREAM_LIMIT,
            reuse_address=True,
        )
        for sock in self.server.sockets:
            log.info("MLLP listener on %s", sock.getsockname()[:2])
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _connection(self, reader: Any, writer: Any) -> None:
        address = writer.get_extra_info("peername")
        peer = str(address[0]) if address else None
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await read_block(
                        reader, self.settings.hl7_max_message_bytes, self.settings.network_timeout
                    )
                except TimeoutError:
                    log.warning("MLLP from %s: a message stalled mid-frame; closing", peer)
                    break
                if block is None:
                    break
                reception = await loop.run_in_executor(
                    self.executor, self.receiver.receive, block, peer
                )
                writer.writeblock(reception.ack)
                await writer.drain()
                if reception.study_ids and self.on_recorded is not None:
                    loop.run_in_executor(self.executor, self.on_recorded, reception)
                if not block.complete:
                    break
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s ended: %s", peer, exc)
        except Exception:  # bad input never stops the listener: this connection ends, no more
            log.exception("MLLP connection from %s failed", peer)
        finally:
            writer.close()

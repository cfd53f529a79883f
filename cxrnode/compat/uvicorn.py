"""Every use of uvicorn's internals, in one place: a server without an idle tick.

uvicorn's ``Server.main_loop`` wakes ten times a second to refresh its Date header and to
look for a shutdown request. :func:`quiet_server` returns, for a tested uvicorn release
(:data:`TESTED_VERSIONS`), a subclass whose ``main_loop`` sleeps until SIGTERM/SIGINT
(``handle_exit``), so an idle web app uses no CPU; the app adds the Date header per
response (``date_header=False`` in its config). It relies on ``Server.main_loop``,
``Server.on_tick`` and ``Server.handle_exit`` and on ``should_exit``: :func:`problem` checks
them. With another release, or when they moved, the stock server runs (one warning says
why): correct, only not quiet. Nothing else in the node touches uvicorn's internals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

__all__ = ["TESTED_VERSIONS", "problem", "quiet_server"]

#: uvicorn releases whose Server.main_loop / on_tick / handle_exit the quiet server replaces.
TESTED_VERSIONS = frozenset({"0.54.0"})

#: What to do when the installed uvicorn is not one the quiet server was tested with.
REMEDY = (
    "install the tested release (pip install 'uvicorn==0.54.0', pinned in pyproject.toml) "
    "or adapt cxrnode/compat/uvicorn.py to the new one"
)


def problem() -> str | None:
    """Why the quiet server cannot run on the installed uvicorn (None: it can)."""
    version = getattr(uvicorn, "__version__", "?")
    if version not in TESTED_VERSIONS:
        return f"uvicorn {version} is not one of the tested releases {sorted(TESTED_VERSIONS)}"
    missing = [
        name
        for name in ("main_loop", "on_tick", "handle_exit")
        if not hasattr(uvicorn.Server, name)
    ]
    if missing:
        return f"uvicorn {version} lacks Server.{', Server.'.join(missing)}"
    return None


class QuietServer(uvicorn.Server):
    """uvicorn's server, sleeping between requests instead of ticking (see module)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _exit: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        await self.on_tick(0)  # sets the default headers once (no Date: added per response)
        if not self.should_exit:
            await self._exit.wait()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._exit is not None:
            self._loop.call_soon_threadsafe(self._exit.set)


def quiet_server(config: uvicorn.Config) -> uvicorn.Server:
    """A :class:`QuietServer` for ``config`` on a tested uvicorn; the stock server otherwise
    (with one warning saying what to do)."""
    reason = problem()
    if reason is None:
        return QuietServer(config)
    log.warning("%s: its stock loop runs (ten wake-ups a second); %s", reason, REMEDY)
    return uvicorn.Server(config)

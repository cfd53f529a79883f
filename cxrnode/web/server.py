"""The web app's process: uvicorn serving :func:`cxrnode.web.app.create_app` on HTTP_PORT.

`cxrnode serve` runs it as its ``web`` child (restarted by the supervisor's watcher if it
exits). This module imports only the standard library at the top, so the supervisor can name
:func:`run_web` as a process target without loading FastAPI.

**No idle tick.** uvicorn's ``Server.main_loop`` wakes ten times a second to refresh its Date
header and to look for a shutdown request. :class:`QuietServer` (for the tested uvicorn
release, :data:`TESTED_UVICORN`) instead sleeps until SIGTERM/SIGINT and adds the Date header
per response, so an idle web app uses no CPU. With another uvicorn release the stock loop runs
(a warning says so): correct, only not quiet.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from cxrnode.settings import Settings

log = logging.getLogger(__name__)

#: The uvicorn release whose Server.main_loop / handle_exit QuietServer replaces.
TESTED_UVICORN = "0.54.0"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def has_token(settings: Settings) -> bool:
    token = settings.api_token
    return token is not None and bool(token.get_secret_value().strip())


def exposure_problem(settings: Settings) -> str | None:
    """Why the web app must not start with these settings (None: it may)."""
    if has_token(settings) or is_loopback(settings.http_host) or settings.http_allow_no_token:
        return None
    if settings.ldap_url:  # every login goes to the directory
        return None
    return (
        f"the admin web app would listen on {settings.http_host}:{settings.http_port} without "
        "a token, so anyone who reaches it could re-run studies and resend outputs; set "
        "CXRNODE_API_TOKEN (16 or more random characters), or CXRNODE_HTTP_HOST=127.0.0.1, or "
        "CXRNODE_HTTP_ALLOW_NO_TOKEN=true when a reverse proxy in front authenticates"
    )


def _quiet_server_class() -> type:
    import asyncio

    import uvicorn

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

    return QuietServer


def run_web(settings: Settings) -> None:
    """Body of the ``web`` process: serve until SIGTERM."""
    from cxrnode.net.listener import die_with_parent

    die_with_parent()
    from cxrnode.logs import setup_logging

    setup_logging(settings.log_level, settings)
    problem = exposure_problem(settings)
    if problem:
        raise SystemExit(f"cxrnode web: {problem}")
    import uvicorn

    from cxrnode.web.app import create_app

    if has_token(settings) and len(settings.api_token.get_secret_value()) < 16:  # type: ignore[union-attr]
        log.warning("API_TOKEN is shorter than 16 characters: use a long random one")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,  # the node's logging (cxrnode.logs)
        access_log=False,  # paths carry filter values; actions are logged by the app
        server_header=False,
        date_header=False,  # added per response by the app (QuietServer has no tick)
        lifespan="on",
        timeout_graceful_shutdown=5,
        # HTTPS for sites without a reverse proxy (docs/security.md); HSTS is then sent
        ssl_certfile=str(settings.http_tls_cert) if settings.http_tls_cert else None,
        ssl_keyfile=str(settings.http_tls_key) if settings.http_tls_key else None,
    )
    if uvicorn.__version__ == TESTED_UVICORN:
        server = _quiet_server_class()(config)
    else:
        log.warning(
            "uvicorn %s is not the tested %s: its stock loop runs (ten wake-ups a second)",
            uvicorn.__version__,
            TESTED_UVICORN,
        )
        server = uvicorn.Server(config)
    server.run()

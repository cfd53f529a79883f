"""The web app's process: uvicorn serving :func:`cxrnode.web.app.create_app` on HTTP_PORT.

`cxrnode serve` runs it as its ``web`` child (restarted by the supervisor's watcher if it
exits). This module imports only the standard library and the settings at the top, so the
supervisor can name :func:`run_web` as a process target without loading FastAPI or uvicorn:
those are imported inside :func:`run_web`, in the web process only.

**No idle tick.** The server is :func:`cxrnode.compat.uvicorn.quiet_server`: it sleeps
between requests instead of waking ten times a second (the app adds the Date header per
response).
"""

from __future__ import annotations

import logging

from cxrnode.process import become
from cxrnode.settings import Settings
from cxrnode.web.exposure import exposure_problem, has_token

log = logging.getLogger(__name__)

__all__ = ["run_web"]


def run_web(settings: Settings) -> None:
    """Body of the ``web`` process: serve until SIGTERM."""
    become(f"web (port {settings.http_port})")
    from cxrnode.logs import setup_logging

    setup_logging(settings.log_level, settings)
    problem = exposure_problem(settings)
    if problem:
        raise SystemExit(f"cxrnode web: {problem}")
    import uvicorn

    from cxrnode.compat.uvicorn import quiet_server
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
    quiet_server(config).run()

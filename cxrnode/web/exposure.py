"""Whether the admin web app may listen where the settings say, without or with a token.

Asked by the supervisor before it starts the web process (`cxrnode serve` exits 2 with the
reason), by the web process itself, and by :mod:`cxrnode.web.auth` (a loopback-only app
without a token lets local callers in). A module of its own so that none of them imports
another's process code.
"""

from __future__ import annotations

import ipaddress

from cxrnode.settings import Settings

__all__ = ["exposure_problem", "has_token", "is_loopback"]


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

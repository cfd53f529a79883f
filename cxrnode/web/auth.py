"""Who may use the web app, and how each request proves it.

- **API** (``/api/v1``): ``Authorization: Bearer <API_TOKEN>`` on every route. Missing:
  401 with ``WWW-Authenticate: Bearer``; wrong: 403. The token is compared in constant time,
  never read from a URL, and never logged.
- **Dashboard**: asks for the token once (``POST /login``, a form), then keeps a session in a
  signed, HttpOnly, SameSite=Strict cookie (itsdangerous). Its key derives from the token, so
  changing API_TOKEN ends every session; a session lasts SESSION_HOURS. Pages without a
  session redirect to the login; actions without one get 401.
- **CSRF**: each session holds a random token that every dashboard action (a POST form)
  must send back (403 otherwise). On every state-changing request, from any client, an
  ``Origin`` header must name this host and ``Sec-Fetch-Site`` must be ``same-origin`` or
  ``none`` (a browser's cross-site request is refused with 403).
- **Health and metrics** are open unless HEALTH_OPEN / METRICS_OPEN are false; then they
  take the bearer token (or a dashboard session).
- **No API_TOKEN**: nothing is asked, which the node allows only on a loopback HTTP_HOST
  (:func:`cxrnode.web.exposure.exposure_problem`); requests whose Host header is not a loopback
  name are then refused, so a web page cannot reach the node through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Form, HTTPException, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from itsdangerous import BadSignature, URLSafeTimedSerializer

from cxrnode.settings import Settings
from cxrnode.web.exposure import has_token, is_loopback

log = logging.getLogger(__name__)

SESSION_COOKIE = "cxrnode_session"
CSRF_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
bearer = HTTPBearer(auto_error=False, description="API_TOKEN")


@dataclass(frozen=True)
class DashboardSession:
    csrf: str


class LoginRequired(Exception):
    """A dashboard page was asked for without a session (answered with a redirect)."""


class Auth:
    """The token, the session cookies and the checks, for one web app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.required = has_token(settings)
        token = settings.api_token.get_secret_value().encode() if self.required else b""  # type: ignore[union-attr]
        self._token = token
        key = (
            hmac.new(token, b"cxrnode dashboard session", hashlib.sha256).digest()
            if self.required
            else secrets.token_bytes(32)
        )
        self._sessions = URLSafeTimedSerializer(key, salt="cxrnode-session")
        self.max_age = int(settings.session_hours * 3600)
        self.loopback_only = not self.required and is_loopback(settings.http_host)

    # --------------------------------------------------------------------------- the token
    def token_matches(self, candidate: str | None) -> bool:
        if not self.required:
            return True
        if not candidate:
            return False
        return hmac.compare_digest(candidate.strip().encode(), self._token)

    def check_bearer(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 (no token) or 403 (wrong token) unless the bearer token is right."""
        if not self.required:
            return
        if credentials is None or not credentials.credentials:
            raise HTTPException(
                401,
                "this route needs the API token: send 'Authorization: Bearer <API_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.token_matches(credentials.credentials):
            raise HTTPException(403, "the API token is wrong")

    # --------------------------------------------------------------------------- sessions
    def session(self, request: Request) -> DashboardSession | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self._sessions.loads(raw, max_age=self.max_age)
        except BadSignature:
            return None
        csrf = data.get("csrf") if isinstance(data, dict) else None
        return DashboardSession(csrf) if isinstance(csrf, str) and csrf else None

    @staticmethod
    def new_session() -> DashboardSession:
        return DashboardSession(secrets.token_urlsafe(32))

    def set_cookie(self, request: Request, response: Response, session: DashboardSession) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            self._sessions.dumps({"csrf": session.csrf}),
            max_age=self.max_age,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )

    @staticmethod
    def end_session(response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/")

    # --------------------------------------------------------------------------- requests
    def refusal(self, request: Request) -> tuple[int, str] | None:
        """Checks every request gets before routing (None: go on)."""
        host = request.headers.get("host", "")
        if self.loopback_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return 403, "without API_TOKEN the web app answers only to loopback host names"
        if request.method in UNSAFE_METHODS:
            origin = request.headers.get("origin")
            if origin and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
                return 403, "cross-origin request refused"
            if origin == "null":
                return 403, "cross-origin request refused"
            fetch_site = request.headers.get("sec-fetch-site")
            if fetch_site and fetch_site not in ("same-origin", "none"):
                return 403, "cross-site request refused"
        return None


def auth_of(request: Request) -> Auth:
    return request.app.state.auth


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """API routes: the bearer token."""
    auth_of(request).check_bearer(credentials)


def require_token_or_session(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Health and metrics when they are closed: the bearer token or a dashboard session."""
    auth = auth_of(request)
    if credentials is None and auth.session(request) is not None:
        return
    auth.check_bearer(credentials)


def page_session(request: Request) -> DashboardSession:
    """Dashboard pages: the session (redirect to the login without one). Without API_TOKEN
    a page without one starts one (an empty CSRF token here: see the dashboard's render)."""
    auth = auth_of(request)
    session = auth.session(request)
    if session is None and auth.required:
        raise LoginRequired()
    return session or DashboardSession("")


def action_session(request: Request, csrf_token: Annotated[str, Form()] = "") -> DashboardSession:
    """Dashboard actions: a session (401) and its CSRF token sent back (403)."""
    session = auth_of(request).session(request)
    if session is None:
        raise HTTPException(401, "log in to the dashboard first")
    if not csrf_token or not hmac.compare_digest(csrf_token, session.csrf):
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page")
    return session


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"

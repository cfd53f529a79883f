"""Who may use the web app, and how each request proves it.

**Principals.** Every request is made by a :class:`Principal` (a name and a
:class:`~cxrnode.web.accounts.Role`): :func:`current_principal` says who, for any route.

- **API** (``/api/v1``): ``Authorization: Bearer <token>`` on every route, where the token is
  a service account's (``cxrnode token create``: its name and role) or API_TOKEN, the
  bootstrap admin credential (principal ``api-token``, role admin). Missing: 401 with
  ``WWW-Authenticate: Bearer``; wrong, expired or revoked: 403 (a Security Alert). Tokens are
  compared by SHA-256 lookup or in constant time, never read from a URL, never logged.
- **Dashboard**: ``POST /login`` with a name and password (a local account, or the directory
  when LDAP_URL is set: :mod:`cxrnode.web.directory`), or with a token. The session is a
  signed, HttpOnly, SameSite=Strict cookie (itsdangerous) holding the name, role, login time
  and a CSRF token. It ends after SESSION_IDLE_MINUTES without a request or SESSION_HOURS
  after the login; its key is a random file under DATA_DIR mixed with API_TOKEN, so changing
  API_TOKEN ends every session. Pages without a session redirect to the login; actions
  without one get 401. Failed logins are counted per name and per address: past
  LOGIN_MAX_FAILURES in LOGIN_LOCKOUT_MINUTES both are locked out for that long (429, a
  Security Alert).
- **Roles**: every route declares the least role it needs with one of :class:`ApiRole`,
  :class:`PageRole`, :class:`ActionRole` or :class:`AnyRole`; a lower role gets 403 (a
  Security Alert). :func:`route_roles` lists every route's role (``/api/v1/roles``), and the
  app refuses to start with a route that declares none.
- **CSRF**: each session holds a random token that every dashboard action (a POST form)
  must send back (403 otherwise). On every state-changing request, from any client, an
  ``Origin`` header must name this host and ``Sec-Fetch-Site`` must be ``same-origin`` or
  ``none`` (a browser's cross-site request is refused with 403).
- **Health and metrics** are open unless HEALTH_OPEN / METRICS_OPEN are false; then they
  take a bearer token or a dashboard session (viewer).
- **Nobody to ask**: without API_TOKEN, directory, local accounts or service tokens, nothing
  is asked (the principal is ``local``, admin), which the node allows only on a loopback
  HTTP_HOST (:func:`cxrnode.web.exposure.exposure_problem`); requests whose Host header is not a
  loopback name are then refused, so a web page cannot reach the node through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Form, HTTPException, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from cxrnode.settings import Settings
from cxrnode.web.accounts import Role
from cxrnode.web.exposure import has_token, is_loopback

log = logging.getLogger(__name__)

SESSION_COOKIE = "cxrnode_session"
CSRF_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
bearer = HTTPBearer(auto_error=False, description="a service account's token, or API_TOKEN")
#: A session cookie is signed again (its idle clock restarted) at most this often.
REFRESH_SECONDS = 30


@dataclass(frozen=True)
class Principal:
    """Who makes a request: ``via`` is ``session``, ``token`` (a service account),
    ``api-token`` (the bootstrap credential) or ``open`` (nobody is asked)."""

    name: str
    role: Role
    via: str

    def allows(self, needed: Role) -> bool:
        return self.role.allows(needed)


@dataclass(frozen=True)
class DashboardSession:
    csrf: str
    name: str = ""
    role: Role = Role.VIEWER
    source: str = "local"  # local, directory or token
    started: float = 0.0


class LoginRequired(Exception):
    """A dashboard page was asked for without a session (answered with a redirect)."""


def _session_key(settings: Settings) -> bytes:
    """A random key kept under DATA_DIR (created once, 0600), mixed with API_TOKEN."""
    path: Path = settings.data_dir / "web-session.key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
        else:
            key = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key)
                handle.flush()
                os.fsync(handle.fileno())
    token = settings.api_token.get_secret_value().encode() if has_token(settings) else b""  # type: ignore[union-attr]
    return hmac.new(key, b"cxrnode dashboard session\0" + token, hashlib.sha256).digest()


class Throttle:
    """Failed logins per name and per address in a sliding window (one web process)."""

    def __init__(self, limit: int, window_seconds: float) -> None:
        self.limit = limit
        self.window = window_seconds
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        entries = self._failures.setdefault(key, deque())
        while entries and entries[0] <= now - self.window:
            entries.popleft()
        return entries

    def locked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.limit for k in keys)

    def fail(self, *keys: str) -> bool:
        """Count a failure; whether this one started a lock-out."""
        now = time.monotonic()
        started = False
        with self._lock:
            for key in keys:
                entries = self._recent(key, now)
                entries.append(now)
                started |= len(entries) == self.limit
        return started

    def succeed(self, name_key: str) -> None:
        with self._lock:
            self._failures.pop(name_key, None)


class Auth:
    """The credentials, the session cookies and the checks, for one web app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.has_api_token = has_token(settings)
        self._token = (
            settings.api_token.get_secret_value().encode() if self.has_api_token else b""  # type: ignore[union-attr]
        )
        self._sessions = URLSafeTimedSerializer(_session_key(settings), salt="cxrnode-session")
        self.max_age = int(settings.session_hours * 3600)
        self.idle = int(settings.session_idle_minutes * 60)
        self.throttle = Throttle(settings.login_max_failures, settings.login_lockout_minutes * 60)
        self.readers: Any = None
        self.writers: Any = None
        self._accounts_known: tuple[float, bool] = (0.0, False)

    def bind(self, readers: Any, writers: Any) -> None:
        """The database, for local accounts and service-account tokens."""
        self.readers, self.writers = readers, writers

    # --------------------------------------------------------------------------- is anyone asked
    @property
    def required(self) -> bool:
        """Whether requests must prove who makes them (see the module: nobody to ask)."""
        if self.has_api_token or self.settings.ldap_url:
            return True
        checked, known = self._accounts_known
        if known or time.monotonic() - checked < 5:
            return known
        from cxrnode.web.accounts import any_accounts

        try:
            with self.readers() as session:
                known = any_accounts(session)
        except Exception:
            known = False  # no schema yet: nothing to ask with
        self._accounts_known = (time.monotonic(), known)
        return known

    @property
    def loopback_only(self) -> bool:
        return not self.required and is_loopback(self.settings.http_host)

    # --------------------------------------------------------------------------- tokens
    def token_matches(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is API_TOKEN (always true when nobody is asked)."""
        if not self.required:
            return True
        if not candidate or not self.has_api_token:
            return False
        return hmac.compare_digest(candidate.strip().encode(), self._token)

    def token_principal(self, token: str | None) -> Principal | None:
        """The principal a bearer token stands for (None: unknown, expired or revoked)."""
        if not token:
            return None
        if self.has_api_token and hmac.compare_digest(token.strip().encode(), self._token):
            return Principal("api-token", Role.ADMIN, "api-token")
        if self.writers is None:
            return None
        from cxrnode.web.accounts import token_holder

        try:
            with self.writers() as session:
                holder = token_holder(session, token.strip())
        except Exception:
            log.exception("the API token table cannot be read")
            return None
        return Principal(holder.name, holder.role, "token") if holder else None

    # --------------------------------------------------------------------------- sessions
    def session(self, request: Request) -> DashboardSession | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data, signed = self._sessions.loads(raw, max_age=self.idle, return_timestamp=True)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        started = float(data.get("t0", 0))
        if time.time() - started > self.max_age:
            return None
        try:
            role = Role(data.get("r", "viewer"))
        except ValueError:
            return None
        found = DashboardSession(
            data["csrf"], str(data.get("u", "")), role, str(data.get("s", "local")), started
        )
        automatic = request.headers.get("x-cxrnode-refresh") == "1"  # the page's own refresh
        if not automatic and time.time() - signed.timestamp() > REFRESH_SECONDS:
            request.state.refresh_session = found  # the middleware signs it again
        return found

    @staticmethod
    def new_session(
        name: str = "", role: Role = Role.VIEWER, source: str = "local"
    ) -> DashboardSession:
        return DashboardSession(secrets.token_urlsafe(32), name, role, source, time.time())

    def set_cookie(self, request: Request, response: Response, session: DashboardSession) -> None:
        value = self._sessions.dumps(
            {
                "csrf": session.csrf,
                "u": session.name,
                "r": session.role.value,
                "s": session.source,
                "t0": session.started or time.time(),
            }
        )
        response.set_cookie(
            SESSION_COOKIE,
            value,
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
            return (
                403,
                "without credentials to ask for, the web app answers only to loopback host names",
            )
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


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# ------------------------------------------------------------------------------ who is asking


OPEN = Principal("local", Role.ADMIN, "open")


def current_principal(request: Request) -> Principal | None:
    """Who makes this request (None: nobody proved anything). The identity helper for every
    route: a bearer token first, then the dashboard session; when nobody is asked,
    :data:`OPEN`."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    auth = auth_of(request)
    found: Principal | None = None
    if not auth.required:
        found = OPEN
    else:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            found = auth.token_principal(token)
        else:
            session = auth.session(request)
            if session is not None and session.name:
                found = Principal(session.name, session.role, "session")
    if found is not None:
        request.state.principal = found
    return found


def _refuse_role(request: Request, principal: Principal, needed: Role) -> HTTPException:
    from cxrnode.web.trail import alert

    alert(
        request,
        principal.name,
        f"role {principal.role.value} may not use a route for {needed.value}",
    )
    log.warning(
        "refused %s %s to %s (role %s, needs %s)",
        request.method,
        request.url.path,
        principal.name,
        principal.role.value,
        needed.value,
    )
    return HTTPException(
        403, f"this needs the {needed.value} role; {principal.name} is {principal.role.value}"
    )


class RoleCheck:
    """Base of the role declarations; ``role`` is the least role the route needs."""

    kind = "any"

    def __init__(self, role: Role) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role.value})"


class ApiRole(RoleCheck):
    """API routes: a bearer token whose principal has ``role`` (401 / 403)."""

    kind = "api"

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        auth = auth_of(request)
        if not auth.required:
            request.state.principal = OPEN
            return OPEN
        if credentials is None or not credentials.credentials:
            raise HTTPException(
                401,
                "this route needs a token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = current_principal(request)
        if principal is None or principal.via == "session":
            from cxrnode.web.trail import alert

            alert(request, "unknown", "a bearer token that is wrong, expired or revoked")
            raise HTTPException(403, "the token is wrong, expired or revoked")
        if not principal.allows(self.role):
            raise _refuse_role(request, principal, self.role)
        return principal


class AnyRole(RoleCheck):
    """Health and metrics when closed: a bearer token or a dashboard session."""

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        auth = auth_of(request)
        if credentials is None and auth.session(request) is not None:
            principal = current_principal(request)
            if principal is not None:
                return principal
        return ApiRole(self.role)(request, credentials)


class PageRole(RoleCheck):
    """Dashboard pages: the session (a redirect to the login without one). When nobody is
    asked, a page without one starts one (an empty CSRF token here: see the dashboard)."""

    kind = "page"

    def __call__(self, request: Request) -> DashboardSession:
        auth = auth_of(request)
        session = auth.session(request)
        if not auth.required:
            request.state.principal = OPEN
            csrf = session.csrf if session else ""  # empty: the page starts a session
            return DashboardSession(csrf, OPEN.name, Role.ADMIN, "open")
        if session is None or not session.name:
            raise LoginRequired()
        principal = current_principal(request)
        assert principal is not None
        if not principal.allows(self.role):
            raise _refuse_role(request, principal, self.role)
        return session


class ActionRole(RoleCheck):
    """Dashboard actions: a session (401), its CSRF token sent back (403), and the role."""

    kind = "action"

    def __call__(
        self, request: Request, csrf_token: Annotated[str, Form()] = ""
    ) -> DashboardSession:
        auth = auth_of(request)
        session = auth.session(request)
        if session is None:
            raise HTTPException(401, "log in to the dashboard first")
        if not csrf_token or not hmac.compare_digest(csrf_token, session.csrf):
            raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page")
        if not auth.required:
            request.state.principal = OPEN
            return session
        principal = current_principal(request)
        if principal is None:
            raise HTTPException(401, "log in to the dashboard first")
        if not principal.allows(self.role):
            raise _refuse_role(request, principal, self.role)
        return session


# The names routes used before roles existed, kept for code that still says them.
require_token = ApiRole(Role.VIEWER)
require_token_or_session = AnyRole(Role.VIEWER)
page_session = PageRole(Role.VIEWER)
action_session = ActionRole(Role.VIEWER)


def route_roles(app: Any) -> dict[str, str]:
    """``"METHOD /path"`` -> the least role each route needs (or ``public``); raises when a
    route outside :data:`PUBLIC` declares none, so no route is left open by omission."""
    table: dict[str, str] = {}
    missing: list[str] = []
    for path, methods, checks in _walk(app.routes, "", []):
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            key = f"{method} {path}"
            if checks:
                table[key] = max((c.role for c in checks), key=lambda r: r.rank).value
            elif key in PUBLIC or not _guarded(app, key):
                table[key] = "public"
            else:
                missing.append(key)
    if missing:
        raise RuntimeError(f"routes without a declared role: {', '.join(sorted(missing))}")
    return table


def _walk(routes: Any, prefix: str, inherited: list[Any]) -> Any:
    """(path, methods, role checks) of every route, through included routers (FastAPI
    includes them lazily, keeping the router's own routes and the include's prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = route.include_context
            extra = [d.dependency for d in context.dependencies]
            yield from _walk(
                included.routes,
                prefix + context.prefix,
                inherited + [c for c in extra if isinstance(c, RoleCheck)],
            )
            continue
        methods = getattr(route, "methods", None)
        dependant = getattr(route, "dependant", None)
        if not methods or dependant is None:
            if methods:  # a plain route (the OpenAPI schema)
                yield prefix + route.path, set(methods), list(inherited)
            continue
        checks = [c for c in _calls(dependant) if isinstance(c, RoleCheck)]
        yield prefix + route.path, set(methods), inherited + checks


#: Routes anyone may call: the login, the favicon, health and metrics when they are open.
PUBLIC = frozenset({"GET /login", "POST /login", "GET /favicon.ico", "GET /api/v1/openapi.json"})


def _guarded(app: Any, key: str) -> bool:
    settings = app.state.settings
    if key in ("GET /healthz", "GET /readyz"):
        return not settings.health_open
    if key == "GET /metrics":
        return not settings.metrics_open
    return True


def _calls(dependant: Any) -> list[Any]:
    found = []
    for sub in dependant.dependencies:
        found.append(sub.call)
        found.extend(_calls(sub))
    return found

"""The admin web app: health, metrics, the JSON API and the dashboard, in one FastAPI app.

Every request is served from what it asks at that moment: a read-only database session, the
broker's Redis, the file system. Nothing runs between requests (no timers, no polling), so
an idle web app costs nothing; the dashboard page refreshes itself while it is visible.

=================  ===========================================================
route              what
=================  ===========================================================
/healthz           the process answers (liveness)
/readyz            every readiness check, named (:mod:`cxrnode.web.health`)
/metrics           Prometheus text format (:mod:`cxrnode.web.metrics`)
/api/v1/...        the JSON API (:mod:`cxrnode.web.api`); /api/v1/openapi.json
/, /studies, ...   the dashboard (:mod:`cxrnode.web.dashboard`)
/static/...        its stylesheet and script
=================  ===========================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session

from cxrnode.db import make_engine, make_sessionmaker, utcnow
from cxrnode.monitor.metrics import AgreementCollector
from cxrnode.settings import Settings
from cxrnode.status import quick_redis
from cxrnode.web import api, dashboard
from cxrnode.web.accounts import Role
from cxrnode.web.actions import Actions
from cxrnode.web.auth import AnyRole, Auth, LoginRequired, route_roles
from cxrnode.web.health import Readiness, readiness
from cxrnode.web.metrics import NodeCollector, RetentionCollector, StageHistograms, build_registry

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: Signature of the model-agreement panel's data source (see :mod:`cxrnode.web.agreement`).
AgreementSource = Callable[[Session], Any]


def package_version() -> str:
    try:
        return version("cxrnode")
    except PackageNotFoundError:
        return "0+unknown"


class Resources:
    """What the app's requests share: database sessions, the broker, the actions, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reader_engine = make_engine(settings.effective_database_url, read_only=True)
        self.writer_engine = make_engine(settings.effective_database_url)
        self.readers = make_sessionmaker(self.reader_engine)
        self.writers = make_sessionmaker(self.writer_engine)
        self.redis = quick_redis(settings)
        self.actions = Actions(settings, self.writers, self.redis)
        self.stages = StageHistograms()
        self.registry = build_registry(
            NodeCollector(settings, self.readers, self.redis),
            self.stages,
            AgreementCollector(self.readers, settings),
            RetentionCollector(self.readers),
        )

    def close(self) -> None:
        self.actions.close()
        with contextlib.suppress(Exception):
            self.redis.close()
        self.reader_engine.dispose()
        self.writer_engine.dispose()


def create_app(settings: Settings, *, agreement: AgreementSource | None = None) -> FastAPI:
    """The web app for ``settings``. ``agreement`` feeds the dashboard's model-agreement
    panel (default: :func:`cxrnode.web.agreement.agreement_panel`)."""
    from cxrnode.web.agreement import agreement_panel

    resources = Resources(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            with resources.readers() as session:
                resources.stages.start(session)
        except Exception:  # the database may come later; stages then count from 0
            log.warning("cannot read the job history yet; stage latencies start from zero")
        log.info("admin web app on http://%s:%d", settings.http_host, settings.http_port)
        yield
        resources.close()

    app = FastAPI(
        title="cxrnode admin API",
        version=package_version(),
        description=(
            "Watch and steer a cxrnode node: summary, studies, study detail with the draft "
            "and its delivery, and the actions re-run and resend. Every route takes "
            "`Authorization: Bearer <token>` (a service account's token, or API_TOKEN) and "
            "needs a role: viewer reads, operator acts, admin manages tokens (see "
            "`/api/v1/roles`)."
        ),
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI would load scripts from a CDN; the schema is enough
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth = Auth(settings)
    app.state.auth.bind(resources.readers, resources.writers)
    app.state.resources = resources
    app.state.agreement = agreement or agreement_panel
    app.state.version = package_version()

    @app.middleware("http")
    async def guard_and_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        refusal = request.app.state.auth.refusal(request)
        if refusal is not None:
            response: Response = JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
        else:
            response = await call_next(request)
        refreshed = getattr(request.state, "refresh_session", None)
        if refreshed is not None and "set-cookie" not in response.headers:
            request.app.state.auth.set_cookie(request, response, refreshed)  # idle clock restarts
        headers = response.headers
        headers["date"] = formatdate(usegmt=True)
        if request.url.path.startswith("/static/"):
            headers.setdefault("cache-control", "max-age=3600")
        headers.setdefault("cache-control", "no-store")
        headers["x-content-type-options"] = "nosniff"
        headers["x-frame-options"] = "DENY"
        if request.url.scheme == "https":
            headers["strict-transport-security"] = "max-age=31536000"
        headers["referrer-policy"] = (
            "same-origin"  # no-referrer would make POSTs send "Origin: null"
        )
        headers["content-security-policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)

    guard = [] if settings.health_open else [Depends(AnyRole(Role.VIEWER))]
    metrics_guard = [] if settings.metrics_open else [Depends(AnyRole(Role.VIEWER))]

    @app.get("/healthz", tags=["health"], dependencies=guard)
    def healthz() -> dict[str, str | int]:
        """Liveness: the web process answers (with its process id)."""
        return {"status": "alive", "pid": os.getpid()}

    @app.get(
        "/readyz",
        tags=["health"],
        dependencies=guard,
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A check failed."}},
    )
    def readyz() -> JSONResponse:
        """Readiness: database, broker, data directory, DICOM listener, workers, model."""
        answer = readiness(settings, resources.readers, resources.redis)
        return JSONResponse(
            answer.model_dump(mode="json"), status_code=200 if answer.ready else 503
        )

    @app.get(
        "/metrics", tags=["health"], dependencies=metrics_guard, response_class=PlainTextResponse
    )
    def metrics() -> Response:
        """Prometheus metrics (text format)."""
        try:
            with resources.readers() as session:
                resources.stages.update(session, utcnow())
        except Exception:
            log.warning("stage latencies not updated this scrape", exc_info=True)
        return Response(generate_latest(resources.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    app.include_router(api.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.route_roles = route_roles(app)  # raises when a route declares no role
    return app


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")

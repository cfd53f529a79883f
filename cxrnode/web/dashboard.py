"""The dashboard: server-rendered pages (Jinja2), a stylesheet and a small refresh script.

Pages read the same summary and study views as the API (:mod:`cxrnode.status`,
:mod:`cxrnode.web.studies`). Actions are plain HTML forms (POST, with the session's CSRF
token) that redirect back with a notice, so the dashboard works without JavaScript; the
script only refreshes the panels marked ``data-refresh`` every 10 s while the page is
visible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from cxrnode.db import utcnow
from cxrnode.jobs.rerun import RerunRefused
from cxrnode.status import LastHour, collect_status
from cxrnode.urgent import acknowledge, unacknowledged
from cxrnode.web import trail
from cxrnode.web.accounts import Role
from cxrnode.web.auth import (
    ActionRole,
    DashboardSession,
    PageRole,
    auth_of,
    client_of,
    current_principal,
)
from cxrnode.web.health import readiness
from cxrnode.web.studies import STAGES, STATE_FILTERS, list_studies, study_detail

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
#: Every page and action declares the least role it needs (cxrnode.web.auth).
PageSession = Annotated[DashboardSession, Depends(PageRole(Role.VIEWER))]
ActionSession = Annotated[DashboardSession, Depends(ActionRole(Role.VIEWER))]
OperatorAction = Annotated[DashboardSession, Depends(ActionRole(Role.OPERATOR))]

#: What an action's redirect may say (codes only: no text travels in the URL).
NOTICES = {
    "rerun": "Re-run queued: job version {n} is on its way.",
    "rerun-refused": "This study cannot be re-run now: it is still receiving images, or has "
    "no image the model can read.",
    "resent": "Output {n} is queued again; it is sent within seconds.",
    "resent-dead": "{n} dead letter(s) queued again.",
    "missing": "That study or output does not exist (any more).",
    "login-failed": "That token is not right.",
    "session-ended": "Your session ended; log in again.",
    "acknowledged": "Urgent draft acknowledged.",
}


# ------------------------------------------------------------------------------ formatting


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "-"
    seconds = ((now or utcnow()) - moment).total_seconds()
    if seconds < 60:
        return "just now" if seconds < 5 else f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def utc(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def short_uid(uid: str, keep: int = 10) -> str:
    return uid if len(uid) <= 2 * keep + 1 else f"{uid[:keep]}…{uid[-keep:]}"


TONES = {
    "done": "good",
    "delivered": "good",
    "delivered_warning": "good",
    "stored": "good",
    "failed": "bad",
    "dead": "bad",
    "waiting_model": "warn",
    "skipped": "muted",
    "superseded": "muted",
    "present": "bad",
    "uncertain": "warn",
    "absent": "good",
    "not_mentioned": "muted",
}


def tone(state: str | None) -> str:
    return TONES.get(state or "", "busy")


templates.env.filters.update(
    ago=ago, duration=duration, utc=utc, size=size, short_uid=short_uid, tone=tone
)
templates.env.globals.update(STAGES=STAGES)


# ------------------------------------------------------------------------------ the chart


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    tone: str
    title: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    top: int
    bottom: int
    bars: list[Bar]
    line: str  # SVG polyline points of the median latency
    dots: list[tuple[float, float, str]]
    count_max: int
    latency_max: float
    labels: list[tuple[float, str]]


def chart(hour: LastHour, width: int = 560, height: int = 170) -> Chart:
    """Drafts (and failures, stacked) per five minutes as bars, the median time from arrival
    to draft as a line on its own scale: the geometry of an inline SVG."""
    left, right, top, bottom = 34, 46, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / len(hour.buckets)
    count_max = max(1, max((b.done + b.failed for b in hour.buckets), default=1))
    count_max = _nice(count_max)
    medians = [b.median_seconds for b in hour.buckets if b.median_seconds is not None]
    latency_max = _nice(max(medians)) if medians else 1.0
    bars, points, dots, labels = [], [], [], []
    for i, bucket in enumerate(hour.buckets):
        x = left + i * slot + slot * 0.18
        w = slot * 0.64
        base = top + plot_h
        when = bucket.start.strftime("%H:%M")
        for count, kind in ((bucket.done, "good"), (bucket.failed, "bad")):
            if count:
                h = plot_h * count / count_max
                base -= h
                bars.append(
                    Bar(
                        x,
                        base,
                        w,
                        h,
                        kind,
                        f"{when} UTC: {count} {'drafts' if kind == 'good' else 'failed'}",
                    )
                )
        if bucket.median_seconds is not None:
            cx = left + (i + 0.5) * slot
            cy = top + plot_h * (1 - bucket.median_seconds / latency_max)
            points.append(f"{cx:.1f},{cy:.1f}")
            dots.append((cx, cy, f"{when} UTC: median {duration(bucket.median_seconds)}"))
        if i % 3 == 0 and i:
            labels.append((left + i * slot, when))
    return Chart(
        width, height, top, bottom, bars, " ".join(points), dots, count_max, latency_max, labels
    )


def _nice(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            nice = step * exponent
            return int(nice) if nice >= 1 else nice
    return 10 * exponent


# ------------------------------------------------------------------------------ rendering


def render(request: Request, name: str, session: DashboardSession, **context: Any) -> Response:
    auth = auth_of(request)
    fresh = not session.csrf
    if fresh:
        session = auth.new_session(session.name, session.role, session.source)
    settings = request.app.state.settings
    notice = request.query_params.get("notice")
    text = NOTICES.get(notice or "")
    if text:
        text = text.format(n=request.query_params.get("n", ""))
    response = templates.TemplateResponse(
        request,
        name,
        {
            "csrf": session.csrf,
            "token_required": auth.required,
            "user_name": session.name,
            "user_role": session.role.value,
            "directory": bool(settings.ldap_url),
            "idle_minutes": f"{settings.session_idle_minutes:g}",
            "version": request.app.state.version,
            "ae_title": settings.ae_title,
            "dicom_port": settings.dicom_port,
            "now": utcnow(),
            "notice": text,
            "notice_bad": notice in ("rerun-refused", "missing", "login-failed"),
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **context,
        },
    )
    if fresh:
        auth.set_cookie(request, response, session)
    return response


def automatic(request: Request) -> bool:
    """The page's own 10-second refresh (static/app.js): not a new query by the user, and not
    a use that keeps the session from its idle timeout."""
    return request.headers.get("x-cxrnode-refresh") == "1"


def _back(target: str | None, default: str = "/", **notice: Any) -> RedirectResponse:
    """Redirect to a local path only, with a notice code."""
    path = target if target and target.startswith("/") and not target.startswith("//") else default
    path = path.split("?", 1)[0]
    query = urlencode({k: v for k, v in notice.items() if v is not None})
    return RedirectResponse(f"{path}?{query}" if query else path, status_code=303)


# ------------------------------------------------------------------------------ login


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002
    if not auth_of(request).required:
        return _back(next)
    return render(
        request, "login.html", auth_of(request).new_session(), title="Log in", next=next, bare=True
    )


def _refused_login(request: Request, next: str, text: str, status: int = 401) -> Response:  # noqa: A002
    response = render(
        request,
        "login.html",
        auth_of(request).new_session(),
        title="Log in",
        next=next,
        failed=True,
        failed_text=text,
        bare=True,
    )
    response.status_code = status
    return response


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=128)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    token: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form()] = "/",  # noqa: A002
) -> Response:
    """A name and password (local account or directory), or a token. Failures are counted
    per name and per address; past LOGIN_MAX_FAILURES both are locked out for a while."""
    auth = auth_of(request)
    client = client_of(request)
    name = username.strip() if not token else "token"
    keys = (f"name:{name.lower()}", f"addr:{client}")
    if auth.throttle.locked(*keys):
        trail.login(request, name or "unknown", ok=False, why="locked out after failed logins")
        log.warning("dashboard login refused from %s (locked out)", client)
        return _refused_login(
            request, next, "Too many failed logins: wait a few minutes and try again.", 429
        )
    session, why = _check_login(request, name, password, token)
    if session is None:
        trail.login(request, name or "unknown", ok=False, why=why)
        log.warning("dashboard login refused from %s (%s)", client, why)
        if auth.throttle.fail(*keys):
            trail.alert(request, name or "unknown", "login locked out after repeated failures")
            log.warning("dashboard logins locked out for a name or the address %s", client)
        text = "That token is not right." if token else "That name and password are not right."
        return _refused_login(request, next, text)
    auth.throttle.succeed(keys[0])
    response = _back(next)
    auth.set_cookie(request, response, session)
    trail.login(request, session.name, ok=True)
    log.info("dashboard login from %s (%s, %s)", client, session.source, session.role.value)
    return response


def _check_login(
    request: Request, name: str, password: str, token: str
) -> tuple[DashboardSession | None, str]:
    """The new session, or None and why not (for the audit record; never the secret)."""
    auth = auth_of(request)
    settings = request.app.state.settings
    if token:
        principal = auth.token_principal(token)
        if principal is None:
            return None, "wrong, expired or revoked token"
        return auth.new_session(principal.name, principal.role, "token"), ""
    if not name or not password:
        return None, "name or password missing"
    from cxrnode.web.accounts import authenticate_local

    with request.app.state.resources.readers() as db:
        role = authenticate_local(db, name, password)
    if role is not None:
        return auth.new_session(name, role, "local"), ""
    if settings.ldap_url:
        from cxrnode.web.directory import authenticate

        answer = authenticate(settings, name, password)
        if answer.ok and answer.role is not None:
            return auth.new_session(name, answer.role, "directory"), ""
        return None, f"directory: {answer.why}"
    return None, "wrong name or password"


@router.post("/logout")
def logout(request: Request, session: ActionSession) -> Response:
    response = RedirectResponse("/login", status_code=303)
    auth_of(request).end_session(response)
    if session.name:
        trail.logout(request, session.name)
        log.info("dashboard logout from %s", client_of(request))
    return response


# ------------------------------------------------------------------------------ pages


@router.get("/")
def overview(request: Request, session: PageSession) -> Response:
    resources = request.app.state.resources
    with resources.readers() as db:
        summary = collect_status(resources.settings, session=db, redis=resources.redis)
        recent = list_studies(db, limit=12)
        urgent = unacknowledged(db)
        try:
            agreement = request.app.state.agreement(db)
        except Exception:
            log.exception("the model agreement panel's data source failed")
            agreement = None
        db.rollback()
    ready = readiness(resources.settings, resources.readers, resources.redis)
    if not automatic(request):
        trail.query(request, session.name)
    return render(
        request,
        "overview.html",
        session,
        title="Overview",
        summary=summary,
        ready=ready,
        recent=recent,
        chart=chart(summary.last_hour),
        live_by_queue={
            queue: sum(queue in w.queues for w in summary.workers or []) for queue in summary.queues
        },
        agreement=agreement,
        urgent=urgent,
    )


@router.get("/studies")
def studies_page(
    request: Request,
    session: PageSession,
    state: str | None = None,
    received_from: Annotated[str | None, Query(alias="from")] = None,
    received_to: Annotated[str | None, Query(alias="to")] = None,
    page: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    """The filter form sends empty fields as empty strings: they mean "any"."""
    state = state if state in STATE_FILTERS else None
    start, end = _date(received_from), _date(received_to)
    per_page = 50
    with request.app.state.resources.readers() as db:
        found = list_studies(
            db,
            state=state,
            received_from=start,
            received_to=end,
            limit=per_page,
            offset=(page - 1) * per_page,
        )
    if not automatic(request):
        trail.query(request, session.name)
    filters = {
        "state": state,
        "from": start.isoformat() if start else None,
        "to": end.isoformat() if end else None,
    }
    query = {k: v for k, v in filters.items() if v}
    return render(
        request,
        "studies.html",
        session,
        title="Studies",
        found=found,
        filters=filters,
        states=STATE_FILTERS,
        page=page,
        pages=max(1, math.ceil(found.total / per_page)),
        query=query,
        urlencode=urlencode,
    )


def _date(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


@router.get("/studies/{study_uid}")
def study_page(request: Request, session: PageSession, study_uid: str) -> Response:
    with request.app.state.resources.readers() as db:
        found = study_detail(db, study_uid)
    if found is None:
        raise HTTPException(404, f"no study {study_uid} was received")
    if not automatic(request):
        trail.accessed(request, session.name, study_uid, description="study page with the draft")
    latest = found.jobs[0] if found.jobs else None
    newest_outputs: dict[str, int] = {}
    for output in found.outputs:
        if output.version == found.version:
            newest_outputs[output.state] = newest_outputs.get(output.state, 0) + 1
    answered = next((job for job in found.jobs if job.result is not None), None)
    return render(
        request,
        "study.html",
        session,
        title=f"Study {short_uid(study_uid)}",
        study=found,
        latest=latest,
        answered=answered,
        newest_outputs=newest_outputs,
    )


@router.get("/admin")
def admin_page(
    request: Request, session: Annotated[DashboardSession, Depends(PageRole(Role.ADMIN))]
) -> Response:
    """Local accounts, service-account tokens and the settings in effect (secrets masked)."""
    from cxrnode.settings import masked
    from cxrnode.web.accounts import list_tokens, list_users

    with request.app.state.resources.readers() as db:
        users, tokens = list_users(db), list_tokens(db)
    return render(
        request,
        "admin.html",
        session,
        title="Access",
        users=users,
        tokens=tokens,
        settings_view=masked(request.app.state.settings),
    )


# ------------------------------------------------------------------------------ actions


@router.post("/actions/rerun/{study_uid}")
def rerun_action(
    request: Request, session: OperatorAction, study_uid: str, back: Annotated[str, Form()] = ""
) -> Response:
    try:
        made = request.app.state.resources.actions.rerun(study_uid, _actor(request))
    except LookupError:
        return _back(back, notice="missing")
    except RerunRefused:
        return _back(back, notice="rerun-refused")
    trail.accessed(
        request,
        session.name,
        study_uid,
        action="C",
        description=f"re-run: draft version {made.version}",
    )
    return _back(back, notice="rerun", n=made.version)


@router.post("/actions/resend/{output_id}")
def resend_action(
    request: Request, session: OperatorAction, output_id: int, back: Annotated[str, Form()] = ""
) -> Response:
    try:
        request.app.state.resources.actions.resend_output(output_id, _actor(request))
    except LookupError:
        return _back(back, notice="missing")
    trail.resend(request, session.name, f"output {output_id}")
    return _back(back, notice="resent", n=output_id)


@router.post("/actions/acknowledge/{urgent_id}")
def acknowledge_action(
    request: Request, session: OperatorAction, urgent_id: int, back: Annotated[str, Form()] = ""
) -> Response:
    """Record who acknowledged an urgent draft: the logged-in user's name (on a node that
    asks nobody, the client's address, as the other actions log)."""
    principal = current_principal(request)
    who = principal.name if principal and principal.via != "open" else client_of(request)
    with request.app.state.resources.writers() as db:
        try:
            acknowledge(db, urgent_id, who)
        except LookupError:
            return _back(back, notice="missing")
    log.info("urgent draft %d acknowledged by %s", urgent_id, who)
    return _back(back, notice="acknowledged")


@router.post("/actions/resend-dead")
def resend_dead_action(
    request: Request, session: OperatorAction, back: Annotated[str, Form()] = ""
) -> Response:
    sent = request.app.state.resources.actions.resend_dead(_actor(request))
    trail.resend(request, session.name, f"{len(sent.output_ids)} dead letters")
    return _back(back, notice="resent-dead", n=len(sent.output_ids))


def _actor(request: Request) -> str:
    """Who acts, for the action's log line: the principal's name and the client's address."""
    principal = current_principal(request)
    who = principal.name if principal else "unknown"
    return f"{who} at {client_of(request)}"

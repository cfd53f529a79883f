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
from cxrnode.web.auth import (
    DashboardSession,
    action_session,
    auth_of,
    client_of,
    page_session,
)
from cxrnode.web.health import readiness
from cxrnode.web.studies import STAGES, STATE_FILTERS, list_studies, study_detail

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)
PageSession = Annotated[DashboardSession, Depends(page_session)]
ActionSession = Annotated[DashboardSession, Depends(action_session)]

#: What an action's redirect may say (codes only: no text travels in the URL).
NOTICES = {
    "rerun": "Re-run queued: job version {n} is on its way.",
    "rerun-refused": "This study cannot be re-run now: it is still receiving images, or has "
    "no image the model can read.",
    "resent": "Output {n} is queued again; it is sent within seconds.",
    "resent-dead": "{n} dead letter(s) queued again.",
    "missing": "That study or output does not exist (any more).",
    "login-failed": "That token is not right.",
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
        session = auth.new_session()
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


@router.post("/login")
def login(
    request: Request,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",  # noqa: A002
) -> Response:
    auth = auth_of(request)
    if not auth.token_matches(token):
        log.warning("dashboard login refused from %s (wrong token)", client_of(request))
        response = render(
            request,
            "login.html",
            auth.new_session(),
            title="Log in",
            next=next,
            failed=True,
            bare=True,
        )
        response.status_code = 401
        return response
    response = _back(next)
    auth.set_cookie(request, response, auth.new_session())
    log.info("dashboard login from %s", client_of(request))
    return response


@router.post("/logout")
def logout(request: Request, _: ActionSession) -> Response:
    response = RedirectResponse("/login", status_code=303)
    auth_of(request).end_session(response)
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


# ------------------------------------------------------------------------------ actions


@router.post("/actions/rerun/{study_uid}")
def rerun_action(
    request: Request, _: ActionSession, study_uid: str, back: Annotated[str, Form()] = ""
) -> Response:
    try:
        made = request.app.state.resources.actions.rerun(study_uid, client_of(request))
    except LookupError:
        return _back(back, notice="missing")
    except RerunRefused:
        return _back(back, notice="rerun-refused")
    return _back(back, notice="rerun", n=made.version)


@router.post("/actions/resend/{output_id}")
def resend_action(
    request: Request, _: ActionSession, output_id: int, back: Annotated[str, Form()] = ""
) -> Response:
    try:
        request.app.state.resources.actions.resend_output(output_id, client_of(request))
    except LookupError:
        return _back(back, notice="missing")
    return _back(back, notice="resent", n=output_id)


@router.post("/actions/acknowledge/{urgent_id}")
def acknowledge_action(
    request: Request, session: ActionSession, urgent_id: int, back: Annotated[str, Form()] = ""
) -> Response:
    """Record who acknowledged an urgent draft: the session's user where the web app has
    users, else the client address the other actions log."""
    who = str(getattr(session, "user", None) or client_of(request))
    with request.app.state.resources.writers() as db:
        try:
            acknowledge(db, urgent_id, who)
        except LookupError:
            return _back(back, notice="missing")
    log.info("urgent draft %d acknowledged by %s", urgent_id, who)
    return _back(back, notice="acknowledged")


@router.post("/actions/resend-dead")
def resend_dead_action(
    request: Request, _: ActionSession, back: Annotated[str, Form()] = ""
) -> Response:
    sent = request.app.state.resources.actions.resend_dead(client_of(request))
    return _back(back, notice="resent-dead", n=len(sent.output_ids))

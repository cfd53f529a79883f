"""The JSON API under ``/api/v1`` (OpenAPI schema at ``/api/v1/openapi.json``).

Reads: the summary, studies (filtered by state and arrival, paged) and one study in full.
Actions: re-run a study, resend one output, resend every dead letter. Every route takes the
bearer token (:mod:`cxrnode.web.auth`); actions answer 202 once the change is committed and
the work handed on.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from cxrnode.jobs.rerun import RerunRefused
from cxrnode.status import Summary, collect_status
from cxrnode.web import trail
from cxrnode.web.accounts import Role
from cxrnode.web.actions import RerunAnswer, ResendAnswer
from cxrnode.web.auth import ApiRole, Principal, client_of
from cxrnode.web.studies import STATE_FILTERS, StudyDetail, StudyPage, list_studies, study_detail

#: Every route declares the least role it needs: viewer on the router, more on the route.
Viewer = Annotated[Principal, Depends(ApiRole(Role.VIEWER))]
Operator = Annotated[Principal, Depends(ApiRole(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(ApiRole(Role.ADMIN))]

router = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(ApiRole(Role.VIEWER))],
    responses={
        401: {"description": "No bearer token was sent."},
        403: {
            "description": "The token is wrong, expired or revoked, its role is below the "
            "route's, or a cross-site request."
        },
    },
)

StateFilter = Literal[STATE_FILTERS]  # type: ignore[valid-type]
StudyUID = Annotated[
    str, Path(description="Study Instance UID", max_length=64, pattern=r"^[0-9.]+$")
]


def _resources(request: Request):  # noqa: ANN202
    return request.app.state.resources


@router.get("/summary", response_model=Summary, tags=["summary"])
def summary(request: Request) -> Summary:
    """Counts by state, queues, live workers, the oldest open job, the last hour, disk,
    recent failures and dead letters (what `cxrnode status --json` prints)."""
    resources = _resources(request)
    with resources.readers() as session:
        return collect_status(resources.settings, session=session, redis=resources.redis)


@router.get("/agreement", tags=["agreement"])
def agreement(
    request: Request,
    window_days: Annotated[
        int | None,
        Query(ge=1, le=3650, description="Rolling window in days; omitted: all time."),
    ] = None,
    resamples: Annotated[
        int, Query(ge=0, le=2000, description="Bootstrap resamples for the 95 % intervals.")
    ] = 1000,
) -> dict[str, Any]:
    """AI-radiologist agreement per model and finding (what `cxrnode monitor --json` prints
    for one window): sensitivity, PPV, specificity, F1 and kappa with intervals, and counts.
    Study UIDs only; no patient data."""
    from cxrnode.monitor.agreement import summary as agreement_summary

    resources = _resources(request)
    with resources.readers() as session:
        return agreement_summary(session, resources.settings, window_days, resamples=resamples)


@router.get("/agreement/disagreements", tags=["agreement"])
def agreement_disagreements(
    request: Request,
    window_days: Annotated[int | None, Query(ge=1, le=3650)] = None,
    finding: Annotated[str | None, Query(max_length=32)] = None,
) -> list[dict[str, Any]]:
    """Studies where the draft and the radiologist disagreed (definite pairs), by study UID,
    for error analysis."""
    from cxrnode.monitor.agreement import disagreements

    resources = _resources(request)
    with resources.readers() as session:
        try:
            return disagreements(session, window_days=window_days, finding=finding)
        except ValueError as exc:  # an unknown finding name
            raise HTTPException(status_code=422, detail=str(exc)) from exc


@router.get("/studies", response_model=StudyPage, tags=["studies"])
def studies(
    request: Request,
    who: Viewer,
    state: Annotated[
        StateFilter | None,
        Query(description="The newest job's state, or receiving / skipped for the study's."),
    ] = None,
    received_from: Annotated[
        date | datetime | None,
        Query(description="Last arrival at or after (UTC; a date starts at 00:00)."),
    ] = None,
    received_to: Annotated[
        date | datetime | None,
        Query(description="Last arrival before (UTC; a date includes that whole day)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> StudyPage:
    """Studies, most recent arrival first."""
    trail.query(request, who.name)
    with _resources(request).readers() as session:
        return list_studies(
            session,
            state=state,
            received_from=received_from,
            received_to=received_to,
            limit=limit,
            offset=offset,
        )


@router.get(
    "/studies/{study_uid}",
    response_model=StudyDetail,
    tags=["studies"],
    responses={404: {"description": "No such study was received."}},
)
def study(request: Request, who: Viewer, study_uid: StudyUID) -> StudyDetail:
    """One study: its instances, every job version with its history (``job_events``) and
    stage timings, the draft text and findings, and each output with its delivery attempts."""
    with _resources(request).readers() as session:
        found = study_detail(session, study_uid)
    if found is None:
        raise HTTPException(404, f"no study {study_uid} was received")
    trail.accessed(request, who.name, study_uid, description="study detail with the draft")
    return found


@router.post(
    "/studies/{study_uid}/rerun",
    response_model=RerunAnswer,
    status_code=202,
    tags=["actions"],
    responses={
        404: {"description": "No such study was received."},
        409: {"description": "Still receiving, or no image the model can read."},
    },
)
def rerun(request: Request, who: Operator, study_uid: StudyUID) -> RerunAnswer:
    """Re-run the study (operator): a new job version for its best frontal image; open jobs of
    older versions are superseded. Its new draft replaces the earlier one at the destinations."""
    try:
        made = _resources(request).actions.rerun(study_uid, _actor(request, who))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except RerunRefused as exc:
        raise HTTPException(409, str(exc)) from exc
    trail.accessed(
        request,
        who.name,
        study_uid,
        action="C",
        description=f"re-run: draft version {made.version}",
    )
    return made


@router.post(
    "/outputs/{output_id}/resend",
    response_model=ResendAnswer,
    status_code=202,
    tags=["actions"],
    responses={404: {"description": "No such output."}},
)
def resend_output(request: Request, who: Operator, output_id: int) -> ResendAnswer:
    """Send one output again (operator; tries start again; a corrected destination at the
    same address is followed, see `cxrnode resend`)."""
    try:
        sent = _resources(request).actions.resend_output(output_id, _actor(request, who))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    trail.resend(request, who.name, f"output {output_id}")
    return sent


@router.post("/outputs/resend-dead", response_model=ResendAnswer, status_code=202, tags=["actions"])
def resend_dead(request: Request, who: Operator) -> ResendAnswer:
    """Send every dead letter again (operator; after fixing what made them fail)."""
    sent = _resources(request).actions.resend_dead(_actor(request, who))
    trail.resend(request, who.name, f"{len(sent.output_ids)} dead letters")
    return sent


def _actor(request: Request, who: Principal) -> str:
    return f"{who.name} at {client_of(request)}"


# ------------------------------------------------------------------------------ admin


@router.get("/roles", tags=["admin"])
def roles(request: Request, _: Admin) -> dict[str, str]:
    """Every route of the web app (API and dashboard) and the least role it needs
    (``public``: no credentials; health and metrics when HEALTH_OPEN / METRICS_OPEN)."""
    return request.app.state.route_roles


@router.get("/settings", tags=["admin"])
def settings_view(request: Request, _: Admin) -> dict[str, Any]:
    """The settings in effect, every secret masked (what `cxrnode config show` prints)."""
    from cxrnode.settings import masked

    return masked(_resources(request).settings)


class TokenInfo(BaseModel):
    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class UserInfo(BaseModel):
    name: str
    role: str
    created_at: datetime


@router.get("/users", response_model=list[UserInfo], tags=["admin"])
def users(request: Request, _: Admin) -> list[UserInfo]:
    """Local accounts (directory users are not stored: their groups give their role)."""
    from cxrnode.web.accounts import list_users

    with _resources(request).readers() as session:
        return [
            UserInfo(name=u.name, role=u.role, created_at=u.created_at) for u in list_users(session)
        ]


@router.get("/tokens", response_model=list[TokenInfo], tags=["admin"])
def tokens(request: Request, _: Admin) -> list[TokenInfo]:
    """Service-account tokens: name, role, expiry, last use, revocation (never the token)."""
    from cxrnode.web.accounts import list_tokens

    with _resources(request).readers() as session:
        return [TokenInfo.model_validate(t, from_attributes=True) for t in list_tokens(session)]


class NewTokenAnswer(BaseModel):
    name: str
    role: str
    expires_at: datetime | None
    token: str = Field(description="The token: shown this once, kept only as a hash.")


@router.post("/tokens", response_model=NewTokenAnswer, status_code=201, tags=["admin"])
def create_token(
    request: Request,
    who: Admin,
    name: Annotated[str, Body(max_length=64)],
    role: Annotated[Literal["viewer", "operator", "admin"], Body()],
    expires: Annotated[str | None, Body(description="e.g. 90d, 12h; omitted: never")] = None,
) -> NewTokenAnswer:
    """Make a service account's token (admin)."""
    from cxrnode.web.accounts import create_token as make
    from cxrnode.web.accounts import parse_duration

    try:
        with _resources(request).writers() as session:
            made = make(session, name, Role(role), parse_duration(expires) if expires else None)
            session.commit()
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    trail.security_change(request, who.name, f"token {name} ({role}) created")
    return NewTokenAnswer(
        name=made.name, role=made.role.value, expires_at=made.expires_at, token=made.token
    )


@router.delete("/tokens/{name}", status_code=204, tags=["admin"])
def revoke_token(request: Request, who: Admin, name: Annotated[str, Path(max_length=64)]) -> None:
    """Revoke a service account's token (admin): it is refused from now on."""
    from cxrnode.web.accounts import revoke_token as revoke

    with _resources(request).writers() as session:
        found = revoke(session, name)
        session.commit()
    if not found:
        raise HTTPException(404, f"no live token named {name}")
    trail.security_change(request, who.name, f"token {name} revoked")

"""The JSON API under ``/api/v1`` (OpenAPI schema at ``/api/v1/openapi.json``).

Reads: the summary, studies (filtered by state and arrival, paged) and one study in full.
Actions: re-run a study, resend one output, resend every dead letter. Every route takes the
bearer token (:mod:`cxrnode.web.auth`); actions answer 202 once the change is committed and
the work handed on.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from cxrnode.jobs.rerun import RerunRefused
from cxrnode.status import Summary, collect_status
from cxrnode.web.actions import RerunAnswer, ResendAnswer
from cxrnode.web.auth import client_of, require_token
from cxrnode.web.studies import STATE_FILTERS, StudyDetail, StudyPage, list_studies, study_detail

router = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(require_token)],
    responses={
        401: {"description": "No bearer token was sent."},
        403: {"description": "The bearer token is wrong, or a cross-site request."},
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
def study(request: Request, study_uid: StudyUID) -> StudyDetail:
    """One study: its instances, every job version with its history (``job_events``) and
    stage timings, the draft text and findings, and each output with its delivery attempts."""
    with _resources(request).readers() as session:
        found = study_detail(session, study_uid)
    if found is None:
        raise HTTPException(404, f"no study {study_uid} was received")
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
def rerun(request: Request, study_uid: StudyUID) -> RerunAnswer:
    """Re-run the study: a new job version for its best frontal image; open jobs of older
    versions are superseded. Its new draft replaces the earlier one at the destinations."""
    try:
        return _resources(request).actions.rerun(study_uid, client_of(request))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except RerunRefused as exc:
        raise HTTPException(409, str(exc)) from exc


@router.post(
    "/outputs/{output_id}/resend",
    response_model=ResendAnswer,
    status_code=202,
    tags=["actions"],
    responses={404: {"description": "No such output."}},
)
def resend_output(request: Request, output_id: int) -> ResendAnswer:
    """Send one output again (tries start again; a corrected destination at the same
    address is followed, see `cxrnode resend`)."""
    try:
        return _resources(request).actions.resend_output(output_id, client_of(request))
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc


@router.post("/outputs/resend-dead", response_model=ResendAnswer, status_code=202, tags=["actions"])
def resend_dead(request: Request) -> ResendAnswer:
    """Send every dead letter again (after fixing what made them fail)."""
    return _resources(request).actions.resend_dead(client_of(request))

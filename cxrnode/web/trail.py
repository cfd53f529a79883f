"""The web app's audit records (:mod:`cxrnode.audit`): logins and logouts, queries, studies
opened, actions and refusals, each naming the principal and the client's address.

Routes call these after deciding what happened; each is one local append (no network).
"""

from __future__ import annotations

from fastapi import Request

from cxrnode.audit import StudyObject, auditor, patient_id_of
from cxrnode.audit import messages as m


def _host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _study(request: Request, study_uid: str, description: str | None = None) -> StudyObject:
    try:
        with request.app.state.resources.readers() as session:
            patient = patient_id_of(session, study_uid)
    except Exception:
        patient = None
    return StudyObject(study_uid, patient, description)


def login(request: Request, user: str, *, ok: bool, why: str | None = None) -> None:
    a = auditor(request.app.state.settings)
    a.emit(m.user_authentication(a.node, user, _host(request), login=True, ok=ok, why=why))


def logout(request: Request, user: str) -> None:
    a = auditor(request.app.state.settings)
    a.emit(m.user_authentication(a.node, user, _host(request), login=False, ok=True))


def query(request: Request, user: str) -> None:
    """A study list or search: the path and its filters are the query."""
    a = auditor(request.app.state.settings)
    text = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    a.emit(m.query(a.node, user, _host(request), text))


def accessed(
    request: Request,
    user: str,
    study_uid: str,
    *,
    action: str = "R",
    description: str | None = None,
    outcome: m.Outcome = m.Outcome.SUCCESS,
) -> None:
    """A study page or draft read (R) or a re-run that makes new draft instances (C)."""
    a = auditor(request.app.state.settings)
    a.emit(
        m.instances_accessed(
            a.node,
            user,
            _host(request),
            _study(request, study_uid, description),
            action=action,
            outcome=outcome,
        )
    )


def resend(request: Request, user: str, what: str) -> None:
    """An operator sends outputs again: Begin Transferring, requested by the user (the
    sends themselves are audited by the outbox, per destination)."""
    a = auditor(request.app.state.settings)
    who = m.Participant(user, True, host=_host(request))
    a.emit(m.begin_transferring(a.node, "destinations", None, [], requested_by=who, what=what))


def alert(request: Request, who: str, what: str) -> None:
    """A refusal (bad token, role too low, lock-out): a Security Alert."""
    a = auditor(request.app.state.settings)
    a.emit(
        m.security_alert(
            a.node,
            who,
            _host(request),
            what,
            subject=f"{request.method} {request.url.path}",
            kind=m.EventType.USE_OF_RESTRICTED_FUNCTION,
        )
    )


def security_change(request: Request, who: str, what: str) -> None:
    """An admin changed who may do what (a token made or revoked): a Security Alert with
    event type Security Configuration and outcome success; ``what`` names the change."""
    a = auditor(request.app.state.settings)
    message = m.security_alert(
        a.node,
        who,
        _host(request),
        what,
        subject=f"{request.method} {request.url.path}",
        kind=m.EventType.SECURITY_CONFIGURATION,
        outcome=m.Outcome.SUCCESS,
    )
    a.emit(message)

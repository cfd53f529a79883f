"""Audit records of the DICOM side: instances received in an association, associations
refused, outputs sent to a destination, studies removed by retention.

The listener hands these the association's instance ids when it ends (never from inside a
C-STORE handler): the study and patient of each are read from the database then, so the
C-STORE path does no audit work at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from cxrnode.audit import auditor
from cxrnode.audit import messages as m
from cxrnode.settings import Settings


def _studies(session: Any, instance_ids: Iterable[int]) -> list[m.StudyObject]:
    from cxrnode.db import Instance

    ids = list(instance_ids)
    if not ids:
        return []
    found: dict[str, str | None] = {}
    rows = session.execute(
        select(Instance.study_instance_uid, Instance.header).where(Instance.id.in_(ids))
    )
    for study_uid, header in rows:
        patient = None
        if isinstance(header, dict):
            value = (header.get("00100020") or {}).get("Value") or []
            patient = str(value[0]) if value and value[0] else None
        found.setdefault(study_uid, patient)
    return [m.StudyObject(uid, patient) for uid, patient in found.items()]


def received(
    settings: Settings, sessions: Any, calling_aet: str, host: str | None, ids: list[int]
) -> None:
    """110104 (action C) for what one association stored: its studies and their patients."""
    if not ids:
        return
    with sessions() as session:
        studies = _studies(session, ids)
    a = auditor(settings)
    a.emit(m.instances_transferred(a.node, calling_aet, host, studies, received=True))


def association_refused(settings: Settings, calling_aet: str, host: str | None, why: str) -> None:
    """110113 Security Alert (Node Authentication) for a refused association."""
    a = auditor(settings)
    a.emit(
        m.security_alert(
            a.node,
            calling_aet or "unknown",
            host,
            why,
            subject=f"DICOM association to {settings.ae_title}",
            kind=m.EventType.NODE_AUTHENTICATION,
        )
    )


def tls_refused(settings: Settings, host: str | None, error: BaseException) -> None:
    """110113 Security Alert (Node Authentication) for a failed DICOM TLS handshake."""
    reason = getattr(error, "reason", None) or error.__class__.__name__
    a = auditor(settings)
    a.emit(
        m.security_alert(
            a.node,
            "unknown",
            host,
            f"DICOM TLS handshake failed: {reason}",
            subject=f"DICOM TLS port of {settings.ae_title}",
            kind=m.EventType.NODE_AUTHENTICATION,
        )
    )


def sent(
    settings: Settings,
    destination_aet: str,
    host: str | None,
    study_uid: str,
    patient_id: str | None,
    *,
    ok: bool,
    why: str | None = None,
) -> None:
    """110104 (action R) for an output sent to a destination, or a failed try."""
    a = auditor(settings)
    a.emit(
        m.instances_transferred(
            a.node,
            destination_aet,
            host,
            [m.StudyObject(study_uid, patient_id)],
            received=False,
            outcome=m.Outcome.SUCCESS if ok else m.Outcome.MINOR_FAILURE,
            why=why,
        )
    )


def destination_batch(
    settings: Settings,
    sessions: Any,
    destination: str,
    study_uid: str,
    *,
    begin: bool,
    ok: bool = True,
    why: str | None = None,
) -> None:
    """An outbox batch to ``destination`` (``AET@host:port`` or a URL): 110102 Begin
    Transferring before it, 110104 after it (a failure with its reason)."""
    from cxrnode.audit import patient_id_of

    aet, _, address = destination.partition("@")
    host = address.rsplit(":", 1)[0] if address else None
    with sessions() as session:
        patient = patient_id_of(session, study_uid)
        session.rollback()
    a = auditor(settings)
    if begin:
        a.emit(m.begin_transferring(a.node, aet, host, [m.StudyObject(study_uid, patient)]))
    else:
        sent(settings, aet, host, study_uid, patient, ok=ok, why=why)


def study_deleted(settings: Settings, study_uid: str, patient_id: str | None) -> None:
    """110105 for a study whose files retention removed."""
    a = auditor(settings)
    a.emit(m.study_deleted(a.node, m.StudyObject(study_uid, patient_id)))


def application(settings: Settings, *, started: bool) -> None:
    """110100 Application Start / Stop of `cxrnode serve`."""
    a = auditor(settings)
    a.emit(m.application_activity(a.node, started))

"""Announcing urgent drafts: webhooks (signed JSON POST) and e-mail (SMTP with STARTTLS).

When triage makes a draft urgent, :mod:`cxrnode.outputs.build` records one
:class:`~cxrnode.db.Notification` row per channel target in the same transaction that records
the draft's outputs, so an announcement is as durable as the draft. :func:`send_due` then
sends the due rows and records each outcome; a failed try is retried with the outbox's backoff
(``SEND_RETRY_BASE_SECONDS`` doubling to ``SEND_RETRY_MAX_SECONDS``) until
``NOTIFY_MAX_ATTEMPTS``, then recorded as failed with its reason. The scheduler sends what is
due after each pass, so a receiver that was down gets the message when it is back.

What a receiver gets carries no patient identity (no name, no patient ID, no dates): the
Study Instance UID, the accession number a RIS already knows, the priority, the suspected
findings and a link to the study page. Webhook bodies are signed: header
``X-Cxrnode-Signature: sha256=<hex HMAC-SHA256 of the body with WEBHOOK_SECRET>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import Notification, NotificationState, utcnow
from cxrnode.settings import Settings

__all__ = [
    "SIGNATURE_HEADER",
    "Channel",
    "channels",
    "new_notifications",
    "next_due",
    "send_due",
    "send_one",
    "sign",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Cxrnode-Signature"
TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Channel:
    """One target: a webhook URL, or the e-mail recipient list."""

    kind: str  # "webhook" or "email"
    target: str


def channels(settings: Settings) -> list[Channel]:
    """Every configured target: each webhook URL, and e-mail when SMTP_HOST and SMTP_TO are set."""
    out = [Channel("webhook", url) for url in settings.webhook_urls]
    if settings.smtp_host and settings.smtp_to:
        out.append(Channel("email", ",".join(settings.smtp_to)))
    return out


def urgent_payload(
    *,
    study_uid: str,
    accession: str | None,
    priority: str,
    suspected: Iterable[str],
    job_id: int,
    made_at: datetime,
    test: bool = False,
) -> dict[str, Any]:
    """The JSON body of an announcement (no patient identity; see the module docstring)."""
    findings = list(suspected)
    return {
        "event": "test" if test else "urgent_draft",
        "priority": priority,
        "suspected": findings,
        "title": "AI DRAFT — SUSPECTED "
        + ", ".join(f.replace("_", " ").upper() for f in findings)
        + " — NOT VERIFIED",
        "study_instance_uid": study_uid,
        "accession_number": accession or "",
        "job_id": job_id,
        "made_at": made_at.isoformat() + "Z",
        "study_page": f"/studies/{study_uid}",
    }


def new_notifications(
    settings: Settings, payload: dict[str, Any], urgent_id: int | None, now: datetime
) -> list[Notification]:
    """Rows for every configured channel, due at once (the caller adds and commits them)."""
    return [
        Notification(
            urgent_id=urgent_id,
            channel=channel.kind,
            target=channel.target,
            payload=payload,
            state=NotificationState.pending,
            attempts=0,
            next_try_at=now,
            created_at=now,
        )
        for channel in channels(settings)
    ]


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def send_one(settings: Settings, channel: str, target: str, payload: dict[str, Any]) -> None:
    """Send one announcement; raises ``OSError`` or ``ValueError`` saying what failed."""
    if channel == "webhook":
        _post(settings, target, payload)
    elif channel == "email":
        _mail(settings, target.split(","), payload)
    else:
        raise ValueError(f"unknown notification channel {channel!r}; expected webhook or email")


def _post(settings: Settings, url: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "cxrnode"}
    if settings.webhook_secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, settings.webhook_secret.get_secret_value())
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        raise OSError(f"webhook {url} answered HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        raise OSError(f"webhook {url} cannot be reached: {exc.reason}") from exc
    if not 200 <= status < 300:
        raise OSError(f"webhook {url} answered HTTP {status}")


def _mail(settings: Settings, recipients: list[str], payload: dict[str, Any]) -> None:
    if not settings.smtp_host:
        raise ValueError("SMTP_HOST is not set; e-mail notifications need it")
    message = EmailMessage()
    message["Subject"] = payload["title"]
    message["From"] = settings.smtp_from
    message["To"] = ", ".join(recipients)
    message.set_content(
        "\n".join(
            [
                payload["title"],
                "",
                f"Priority: {payload['priority']}",
                f"Study Instance UID: {payload['study_instance_uid']}",
                f"Accession number: {payload['accession_number'] or '-'}",
                f"Study page: {payload['study_page']}",
                "",
                "An AI draft, not verified by a radiologist.",
            ]
        )
    )
    context = ssl.create_default_context(
        cafile=str(settings.smtp_tls_ca) if settings.smtp_tls_ca else None
    )
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=TIMEOUT_SECONDS) as smtp:
            smtp.ehlo()
            if settings.smtp_starttls:
                smtp.starttls(context=context)
                smtp.ehlo()
            if settings.smtp_user:
                password = (
                    settings.smtp_password.get_secret_value() if settings.smtp_password else ""
                )
                smtp.login(settings.smtp_user, password)
            smtp.send_message(message)
    except smtplib.SMTPException as exc:
        raise OSError(f"SMTP {settings.smtp_host}:{settings.smtp_port}: {exc}") from exc


def _delay(settings: Settings, attempts: int) -> float:
    base, top = settings.send_retry_base_seconds, settings.send_retry_max_seconds
    return min(top, base * 2 ** max(0, attempts - 1))


def send_due(sessions: Any, settings: Settings, now: datetime | None = None) -> int:
    """Send the notifications that are due and record each outcome; returns how many went.

    Each due row is claimed first (its next try moves a lease ahead, committed) so two
    processes never send it twice at once; no transaction is open while sending.
    """
    now = now or utcnow()
    with sessions() as session:
        rows = session.scalars(
            select(Notification)
            .where(
                Notification.state == NotificationState.pending,
                Notification.next_try_at <= now,
            )
            .order_by(Notification.id)
            .limit(100)
            .with_for_update(skip_locked=True)
        ).all()
        work = [(row.id, row.channel, row.target, dict(row.payload)) for row in rows]
        for row in rows:
            row.next_try_at = now + timedelta(seconds=10 * TIMEOUT_SECONDS)
        session.commit()
    sent = 0
    for row_id, channel, target, payload in work:
        error: str | None = None
        try:
            send_one(settings, channel, target, payload)
        except (OSError, ValueError) as exc:
            error = str(exc)
        with sessions() as session:
            row = session.get(Notification, row_id, with_for_update=True)
            if row is None or row.state != NotificationState.pending:
                session.rollback()
                continue
            row.attempts += 1
            at = utcnow()
            if error is None:
                row.state, row.sent_at, row.last_error = NotificationState.sent, at, None
                sent += 1
                log.info("notification %d sent by %s", row_id, channel)
            elif row.attempts >= settings.notify_max_attempts:
                row.state, row.last_error = NotificationState.failed, error
                log.error("notification %d by %s failed for good: %s", row_id, channel, error)
            else:
                row.last_error = error
                row.next_try_at = at + timedelta(seconds=_delay(settings, row.attempts))
                log.warning(
                    "notification %d by %s failed, retried later: %s", row_id, channel, error
                )
            session.commit()
    return sent


def next_due(session: Session) -> datetime | None:
    """When the next pending notification is due."""
    return session.scalar(
        select(func.min(Notification.next_try_at)).where(
            Notification.state == NotificationState.pending
        )
    )

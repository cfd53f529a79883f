"""Notifications: signed webhooks and STARTTLS e-mail against real receivers, retried from the
database while a receiver is down, and ``cxrnode notify test`` for an admin."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from receivers import Hook, Mailbox
from services import free_port
from sqlalchemy import select

from cxrnode import notify
from cxrnode.db import Notification, NotificationState, make_engine, make_sessionmaker, utcnow
from cxrnode.db.migrate import upgrade
from cxrnode.settings import Settings

CLI = str(Path(sys.executable).with_name("cxrnode"))


def _payload() -> dict:
    return notify.urgent_payload(
        study_uid="1.2.3",
        accession="A1",
        priority="stat",
        suspected=["pneumothorax"],
        job_id=1,
        made_at=utcnow(),
    )


def test_a_webhook_that_is_down_is_retried_from_the_table_until_it_answers(
    tmp_path: Path, webhook: Hook
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    down = f"http://127.0.0.1:{free_port()}/hook"
    settings = Settings(
        data_dir=tmp_path,
        webhook_urls=[down, f"http://127.0.0.1:{webhook.port}/hook"],
        send_retry_base_seconds=60,
    )
    now = utcnow()
    with sessions() as session:
        session.add_all(notify.new_notifications(settings, _payload(), None, now))
        session.commit()
    assert notify.send_due(sessions, settings, now) == 1
    with sessions() as session:
        rows = {r.target: r for r in session.scalars(select(Notification))}
    assert rows[down].state == NotificationState.pending and rows[down].attempts == 1
    assert "cannot be reached" in rows[down].last_error
    assert rows[down].next_try_at > now + timedelta(seconds=50)  # backoff, not a busy retry
    with sessions() as session:
        assert notify.next_due(session) == rows[down].next_try_at
        session.rollback()
    assert len(webhook.received) == 1

    # Not due yet: nothing is sent; once due and the receiver answers, it is sent.
    assert notify.send_due(sessions, settings, now + timedelta(seconds=5)) == 0
    fixed = settings.model_copy(update={"webhook_urls": [f"http://127.0.0.1:{webhook.port}/x"]})
    with sessions() as session:
        row = session.get(Notification, rows[down].id)
        row.target = fixed.webhook_urls[0]
        session.commit()
    assert notify.send_due(sessions, fixed, now + timedelta(seconds=120)) == 1
    assert len(webhook.received) == 2
    engine.dispose()


def test_notify_test_sends_through_every_channel_and_says_so(
    tmp_path: Path, webhook: Hook, mailbox: Mailbox
) -> None:
    env = {
        **os.environ,
        "CXRNODE_DATA_DIR": str(tmp_path),
        "CXRNODE_WEBHOOK_URLS": f"http://127.0.0.1:{webhook.port}/hook",
        "CXRNODE_WEBHOOK_SECRET": "s3cret-s3cret",
        "CXRNODE_SMTP_HOST": "127.0.0.1",
        "CXRNODE_SMTP_PORT": str(mailbox.port),
        "CXRNODE_SMTP_TLS_CA": str(mailbox.ca),
        "CXRNODE_SMTP_TO": "a@example.org,b@example.org",
    }
    done = subprocess.run(
        [CLI, "notify", "test"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "webhook" in done.stdout and "email" in done.stdout and "FAILED" not in done.stdout
    ((headers, body),) = webhook.received
    assert headers[notify.SIGNATURE_HEADER] == notify.sign(body, "s3cret-s3cret")
    assert b'"event": "test"' in body
    ((_, recipients, tls),) = mailbox.messages
    assert tls and recipients == ["a@example.org", "b@example.org"]


def test_notify_test_without_a_channel_or_with_a_dead_one_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env["CXRNODE_DATA_DIR"] = str(tmp_path)
    none = subprocess.run([CLI, "notify", "test"], env=env, capture_output=True, text=True)
    assert none.returncode == 2 and "no channel configured" in none.stderr
    env["CXRNODE_SMTP_HOST"], env["CXRNODE_SMTP_PORT"] = "127.0.0.1", str(free_port())
    env["CXRNODE_SMTP_TO"] = "a@example.org"
    dead = subprocess.run([CLI, "notify", "test"], env=env, capture_output=True, text=True)
    assert dead.returncode == 1 and "email a@example.org: FAILED" in dead.stdout

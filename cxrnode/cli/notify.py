"""``cxrnode notify test``: send a test announcement through every configured channel.

What an admin runs after setting up WEBHOOK_URLS or SMTP_*: each channel is tried at once
(not through the retrying table), and the answer says per channel whether it worked and, if
not, why. Exit status 1 when any channel failed, 2 when none is configured.
"""

from __future__ import annotations

import typer

from cxrnode.db import utcnow
from cxrnode.notify import channels, send_one, urgent_payload
from cxrnode.settings import Settings, get_settings

notify_app = typer.Typer(help="Urgent-draft notifications.", no_args_is_help=True)


def test_all(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(channel, target, error or None) for each configured channel, after one test send."""
    payload = urgent_payload(
        study_uid="1.2.3.4.5.6.7.8.9",
        accession="TEST",
        priority="stat",
        suspected=["pneumothorax"],
        job_id=0,
        made_at=utcnow(),
        test=True,
    )
    outcomes = []
    for channel in channels(settings):
        try:
            send_one(settings, channel.kind, channel.target, payload)
        except (OSError, ValueError) as exc:
            outcomes.append((channel.kind, channel.target, str(exc)))
        else:
            outcomes.append((channel.kind, channel.target, None))
    return outcomes


@notify_app.command("test")
def test_command() -> None:
    """Send a test notification through every configured channel (webhooks, e-mail)."""
    try:
        settings = get_settings()
    except Exception as exc:
        typer.echo(f"cxrnode: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    outcomes = test_all(settings)
    if not outcomes:
        typer.echo(
            "cxrnode notify test: no channel configured (set CXRNODE_WEBHOOK_URLS, or "
            "CXRNODE_SMTP_HOST and CXRNODE_SMTP_TO)",
            err=True,
        )
        raise typer.Exit(2)
    for kind, target, error in outcomes:
        shown = target if kind == "email" else target.split("?", 1)[0]  # no query secrets
        typer.echo(f"{kind} {shown}: {'ok' if error is None else 'FAILED: ' + error}")
    if any(error is not None for _, _, error in outcomes):
        raise typer.Exit(1)

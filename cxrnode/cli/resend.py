"""`cxrnode resend`: put outputs back in the outbox (registered in ``cxrnode.cli``)."""

from __future__ import annotations

from typing import Annotated

import typer

from cxrnode.db import Output, make_engine, make_sessionmaker
from cxrnode.settings import get_settings


def resend_command(
    study: Annotated[
        str | None,
        typer.Option(
            "--study", help="Send the current draft (SR and SC) of this Study Instance UID again."
        ),
    ] = None,
    output: Annotated[
        int | None, typer.Option("--output", help="Send this one output (its outbox row id) again.")
    ] = None,
    dead: Annotated[
        bool, typer.Option("--dead", help="Send every output in the dead-letter state again.")
    ] = False,
) -> None:
    """Send outputs again: one study, one output, or every dead letter.

    Rows go back to pending with their tries reset; the running node sends them at once.

    Outputs of a destination entry since corrected follow the entry at the same host and port.
    """
    from cxrnode.outputs.outbox import resend

    if sum((study is not None, output is not None, dead)) != 1:
        typer.echo("cxrnode resend: give exactly one of --study UID, --output ID, --dead", err=True)
        raise typer.Exit(2)
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's message names the option and the problem
        typer.echo(f"cxrnode: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            try:
                ids = resend(session, settings, study_uid=study, output_id=output, dead=dead)
            except LookupError as exc:
                typer.echo(f"cxrnode resend: {exc}", err=True)
                raise typer.Exit(1) from exc
            for output_id in ids:
                row = session.get(Output, output_id)
                assert row is not None
                typer.echo(
                    f"output {row.id}: {row.kind} {row.sop_instance_uid} -> {row.destination}"
                )
    finally:
        engine.dispose()
    typer.echo(f"{len(ids)} output(s) queued again")

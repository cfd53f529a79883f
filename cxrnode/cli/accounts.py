"""`cxrnode user ...` and `cxrnode token ...`: local accounts and service-account API tokens
(registered in ``cxrnode.cli``). Passwords are read from the terminal (or one line of stdin
with ``--password-stdin``) and kept only as a scrypt hash; a token is printed once, alone on
the last line, and kept only as a SHA-256."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from cxrnode.settings import get_settings

user_app = typer.Typer(help="Local accounts (sites without a directory).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens of service accounts.", no_args_is_help=True)


@contextmanager
def _database() -> Any:
    from cxrnode.db import make_engine, make_sessionmaker
    from cxrnode.db.migrate import upgrade

    try:
        settings = get_settings()
    except Exception as exc:
        typer.echo(f"cxrnode: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)  # idempotent: the tables exist before the first account
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _role(text: str) -> Any:
    from cxrnode.web.accounts import Role

    try:
        return Role.parse(text)
    except ValueError as exc:
        typer.echo(f"cxrnode: {exc}", err=True)
        raise typer.Exit(2) from exc


RoleOption = Annotated[str, typer.Option("--role", help="viewer, operator or admin.")]


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: RoleOption,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from one line of stdin.")
    ] = False,
) -> None:
    """Add a local account; the password is asked twice (never an argument: it would show
    in the process list and the shell's history)."""
    from cxrnode.web.accounts import add_user

    chosen = _role(role)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    with _database() as session:
        try:
            add_user(session, name, chosen, password)
        except ValueError as exc:
            typer.echo(f"cxrnode user add: {exc}", err=True)
            raise typer.Exit(2) from exc
        session.commit()
    typer.echo(f"user {name} added ({chosen.value})")


@user_app.command("list")
def user_list() -> None:
    """Local accounts and their roles."""
    from cxrnode.web.accounts import list_users

    with _database() as session:
        for user in list_users(session):
            typer.echo(f"{user.name}\t{user.role}\tcreated {user.created_at:%Y-%m-%d %H:%M} UTC")


@user_app.command("remove")
def user_remove(name: Annotated[str, typer.Argument(help="Login name.")]) -> None:
    """Remove a local account (its sessions end within SESSION_IDLE_MINUTES)."""
    from cxrnode.web.accounts import remove_user

    with _database() as session:
        if not remove_user(session, name):
            typer.echo(f"cxrnode user remove: no user {name!r}", err=True)
            raise typer.Exit(1)
        session.commit()
    typer.echo(f"user {name} removed")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", help="The service account's name.")],
    role: RoleOption,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime, e.g. 90d, 12h, 2w; omitted: none.")
    ] = None,
) -> None:
    """Make a token; it is printed once, alone on the last line (only its hash is kept)."""
    from cxrnode.web.accounts import create_token, parse_duration

    chosen = _role(role)
    try:
        lifetime = parse_duration(expires) if expires else None
    except ValueError as exc:
        typer.echo(f"cxrnode token create: {exc}", err=True)
        raise typer.Exit(2) from exc
    with _database() as session:
        try:
            made = create_token(session, name, chosen, lifetime)
        except ValueError as exc:
            typer.echo(f"cxrnode token create: {exc}", err=True)
            raise typer.Exit(2) from exc
        session.commit()
    until = f"until {made.expires_at:%Y-%m-%d %H:%M} UTC" if made.expires_at else "no expiry"
    typer.echo(f"token {made.name} ({made.role.value}, {until}); shown once, store it now:")
    typer.echo(made.token)


@token_app.command("list")
def token_list() -> None:
    """Tokens: name, role, expiry, last use, revocation (never the token)."""
    from cxrnode.web.accounts import list_tokens

    def when(moment: Any) -> str:
        return f"{moment:%Y-%m-%d %H:%M}" if moment else "-"

    with _database() as session:
        typer.echo("name\trole\texpires\tlast used\trevoked")
        for t in list_tokens(session):
            typer.echo(
                f"{t.name}\t{t.role}\t{when(t.expires_at)}\t{when(t.last_used_at)}\t"
                f"{when(t.revoked_at)}"
            )


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token: the web app refuses it from now on."""
    from cxrnode.web.accounts import revoke_token

    with _database() as session:
        if not revoke_token(session, name):
            typer.echo(f"cxrnode token revoke: no live token {name!r}", err=True)
            raise typer.Exit(1)
        session.commit()
    typer.echo(f"token {name} revoked")

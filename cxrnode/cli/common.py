"""What every command of the command line shares (a module of its own, so that a command's
module never imports the command line's root, which imports every command)."""

from __future__ import annotations

import typer

from cxrnode.settings import Settings, get_settings

__all__ = ["load_settings"]


def load_settings() -> Settings:
    """The settings in effect; invalid ones end the command (exit 2) with pydantic's reason."""
    try:
        return get_settings()
    except Exception as exc:  # pydantic's message names the option and the problem
        typer.echo(f"cxrnode: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc

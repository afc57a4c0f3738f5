"""``adforge users add / list``: the gallery's users (actions are attributed to ``cli:<login name>`` in the audit log)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from cli.errors import console, fail
from cli.options import ConfigOpt, ReviewDbOpt, actor, load_settings, open_db

__all__ = ["app", "users_add", "users_list"]

app = typer.Typer(no_args_is_help=True, help="Gallery users: add, list.")


@app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Sign-in name: lower-case letters, digits, . _ -")],
    role: Annotated[str, typer.Option(help="viewer (read-only), reviewer or admin.")] = "reviewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")] = False,
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add a gallery user; the password is asked for (or read from stdin) and stored as an argon2 hash."""
    from review.auth import AuthError, add_user

    settings = load_settings(config, db_url=db)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    database = open_db(settings.db_url)
    try:
        add_user(database, name, role, password, actor=actor())
    except AuthError as exc:
        raise fail(exc, 2) from None
    finally:
        database.dispose()
    console.print(f"user {escape(name)} added ({role})")


@app.command("list")
def users_list(db: ReviewDbOpt = None, config: ConfigOpt = None) -> None:
    """List gallery users: name, role, whether disabled, last sign-in."""
    from review.auth import list_users

    settings = load_settings(config, db_url=db)
    database = open_db(settings.db_url)
    try:
        for u in list_users(database):
            last = u.last_login_at.strftime("%Y-%m-%d %H:%M") if u.last_login_at else "never"
            typer.echo(f"{u.name}\t{u.role}\t{'disabled' if u.disabled else 'active'}\tlast sign-in {last}")
    finally:
        database.dispose()

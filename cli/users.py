"""``adforge users add / list / passwd / role / disable / enable / remove``: the gallery's users.

Every change is written to the audit log, attributed to ``cli:<login name>``; a new password or role, disabling and
removing end the user's open gallery sessions at once.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from typing import Annotated

import typer
from rich.markup import escape

from cli.errors import console
from cli.options import ConfigOpt, ReviewDbOpt, actor, load_settings, open_db, with_database

__all__ = ["app", "users_add", "users_disable", "users_enable", "users_list", "users_passwd", "users_remove", "users_role"]

app = typer.Typer(no_args_is_help=True, help="Gallery users: add, list, passwd, role, disable, enable, remove.")

NameArg = Annotated[str, typer.Argument(help="Sign-in name: lower-case letters, digits, . _ -")]
PasswordStdinOpt = Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


def _change(db: str | None, config, do: Callable) -> object:
    """Run ``do(database)``; an AuthError (no such user, bad role or password) is a one-line error, exit 2."""
    from review.auth import AuthError

    return with_database(db, config, do, (AuthError,))


def _ended(n: int) -> str:
    return f"; {n} open session(s) ended" if n else ""


@app.command("add")
def users_add(
    name: NameArg,
    role: Annotated[str, typer.Option(help="viewer (read-only), reviewer or admin.")] = "reviewer",
    password_stdin: PasswordStdinOpt = False,
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add a gallery user; the password is asked for (or read from stdin) and stored as an argon2 hash."""
    from review.auth import add_user

    load_settings(config, db_url=db)  # bad settings fail before the password is asked for
    password = _password(password_stdin)
    _change(db, config, lambda database: add_user(database, name, role, password, actor=actor()))
    console.print(f"user {escape(name)} added ({role})")


@app.command("list")
def users_list(db: ReviewDbOpt = None, config: ConfigOpt = None) -> None:
    """List gallery users: name, role, state (active, disabled, locked until ..., removed), last sign-in."""
    from review.auth import REMOVED, list_users

    settings = load_settings(config, db_url=db)
    database = open_db(settings.db_url)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        for u in list_users(database):
            last = u.last_login_at.strftime("%Y-%m-%d %H:%M") if u.last_login_at else "never"
            locked = u.locked_until.replace(tzinfo=u.locked_until.tzinfo or dt.timezone.utc) if u.locked_until else None
            state = ("removed" if u.password_hash == REMOVED else "disabled" if u.disabled else
                     f"locked until {locked:%Y-%m-%d %H:%M} UTC" if locked and locked > now else "active")
            typer.echo(f"{u.name}\t{u.role}\t{state}\tlast sign-in {last}")
    finally:
        database.dispose()


@app.command("passwd")
def users_passwd(name: NameArg, password_stdin: PasswordStdinOpt = False, db: ReviewDbOpt = None,
                 config: ConfigOpt = None) -> None:
    """Set a user's password (asked for, or read from stdin); ends the user's open sessions."""
    from review.auth import set_password

    load_settings(config, db_url=db)
    password = _password(password_stdin)
    ended = _change(db, config, lambda database: set_password(database, name, password, actor=actor()))
    console.print(f"password of {escape(name)} changed{_ended(ended)}")


@app.command("role")
def users_role(name: NameArg, role: Annotated[str, typer.Argument(help="viewer, reviewer or admin.")],
               db: ReviewDbOpt = None, config: ConfigOpt = None) -> None:
    """Give a user another role; ends the user's open sessions."""
    from review.auth import set_role

    ended = _change(db, config, lambda database: set_role(database, name, role, actor=actor()))
    console.print(f"{escape(name)} is {role}{_ended(ended)}")


@app.command("disable")
def users_disable(name: NameArg, db: ReviewDbOpt = None, config: ConfigOpt = None) -> None:
    """Stop a user from signing in; ends the user's open sessions."""
    from review.auth import set_disabled

    changed = _change(db, config, lambda database: set_disabled(database, name, True, actor=actor()))
    console.print(f"{escape(name)} disabled" if changed else f"{escape(name)} was disabled already")


@app.command("enable")
def users_enable(name: NameArg, db: ReviewDbOpt = None, config: ConfigOpt = None) -> None:
    """Let a disabled user sign in again; also lifts a lock from too many failed sign-ins."""
    from review.auth import set_disabled

    changed = _change(db, config, lambda database: set_disabled(database, name, False, actor=actor()))
    console.print(f"{escape(name)} enabled" if changed else f"{escape(name)} was enabled and not locked")


@app.command("remove")
def users_remove(name: NameArg, db: ReviewDbOpt = None, config: ConfigOpt = None) -> None:
    """Remove a user: ends their sessions and deletes their password. The audit log keeps their decisions under
    this name, so the name is not given to anyone else."""
    from review.auth import remove_user

    ended = _change(db, config, lambda database: remove_user(database, name, actor=actor()))
    console.print(f"user {escape(name)} removed{_ended(ended)}")

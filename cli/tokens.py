"""``adforge tokens create / list / revoke``: REST API tokens (``Authorization: Bearer adf_...``).

A token acts as its user, capped by its scope (``read``, or ``submit``: read and start / cancel runs) and the
user's role (a viewer's token only reads). The token is printed once; the database keeps only its sha256.
Creating and revoking are audited, attributed to ``cli:<login name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cli.errors import console
from cli.options import ConfigOpt, ReviewDbOpt, actor, with_database

__all__ = ["app", "tokens_create", "tokens_list", "tokens_revoke"]

app = typer.Typer(no_args_is_help=True, help="REST API tokens: create, list, revoke.")


def _with_db(db: str | None, config, do: Callable) -> object:
    from review.tokens import TokenError

    return with_database(db, config, do, (TokenError,))


@app.command("create")
def tokens_create(
    user: Annotated[str, typer.Argument(help="The gallery user the token acts as.")],
    name: Annotated[str, typer.Option("--name", help="What the token is for (shown in lists).")] = "api",
    scope: Annotated[str, typer.Option("--scope", help="read, or submit (read and start / cancel runs).")] = "read",
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create a token; it is printed once (to stdout, alone, so that scripts can capture it)."""
    from review.tokens import create_token

    text, info = _with_db(db, config, lambda d: create_token(d, user, name, scope, actor=actor()))  # type: ignore[misc]
    console.print(f"token {info.id} for {escape(info.user)} ({' '.join(info.scopes)}); shown only now:", highlight=False)
    print(text)


@app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tokens.")] = None,
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List tokens: id, user, name, prefix, scopes, created, last used, revoked."""
    from review.tokens import list_tokens

    out = Console(highlight=False)
    tokens = _with_db(db, config, lambda d: list_tokens(d, user_name=user))
    for t in tokens:  # type: ignore[union-attr]
        last = t.last_used_at.strftime("%Y-%m-%d %H:%M") if t.last_used_at else "never used"
        state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
        out.print(f"{t.id}\t{escape(t.user)}\t{escape(t.name)}\t{t.prefix}…\t{' '.join(t.scopes)}\t"
                  f"created {t.created_at:%Y-%m-%d %H:%M} by {escape(t.created_by)}\t{last}\t{state}", soft_wrap=True)
    console.print(f"{len(tokens)} token(s)")  # type: ignore[arg-type]


@app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(min=1, help="The token's id (adforge tokens list).")],
    db: ReviewDbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Revoke a token: requests with it are refused (401) from now on."""
    from review.tokens import revoke_token

    info = _with_db(db, config, lambda d: revoke_token(d, token_id, actor=actor()))
    console.print(f"token {info.id} of {escape(info.user)} revoked")  # type: ignore[union-attr]

"""``/tokens``: a user's API tokens for the REST API (``/api/v1``): list, create (the token is shown once) and revoke
their own; an admin sees and revokes everyone's. The tokens themselves live in :mod:`review.tokens` (hashed,
scoped, audited); this module is only the page and its two forms."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import Response

from review.ids import Id
from review.middleware import LimitedRoute
from review.pages import back, flash, render
from review.run_pages import when
from review.security import CurrentUser, current_user
from review.tokens import TokenError, create_token, list_tokens, revoke_token

__all__ = ["router"]

router = APIRouter(route_class=LimitedRoute)
Viewer = Annotated[CurrentUser, Depends(current_user)]
SCOPES = {"read": "read: look at runs and assets", "submit": "submit: also start and cancel runs"}


def _page(request: Request, user: CurrentUser, *, created: str | None = None, created_info: object = None,
          error: str | None = None, status: int = 200) -> Response:
    tokens = list_tokens(request.app.state.db, user_name=None if user.is_admin else user.name)
    scopes = SCOPES if user.can_review else {"read": SCOPES["read"]}  # a viewer's token can never submit
    response = render(request, "tokens.html", {"tokens": tokens, "scopes": scopes, "created": created,
                                               "created_info": created_info, "error": error, "when": when},
                      status=status)
    if created:
        response.headers["Cache-Control"] = "no-store"  # the only time the token's text is shown: keep no copy
    return response


@router.get("/tokens")
def tokens_page(request: Request, user: Viewer) -> Response:
    return _page(request, user)


@router.post("/tokens")
def token_create(request: Request, user: Viewer, name: Annotated[str, Form()],
                 scope: Annotated[str, Form()]) -> Response:
    if scope not in SCOPES:
        return _page(request, user, error=f"scope: must be one of {', '.join(SCOPES)}, got {scope[:20]!r}", status=400)
    try:
        text, info = create_token(request.app.state.db, user.name, name.strip(), scope, actor=user.name)
    except TokenError as exc:
        return _page(request, user, error=str(exc), status=getattr(exc, "status", 400))
    # Rendered straight away, not after a redirect: the token's text never goes into the session cookie.
    return _page(request, user, created=text, created_info=info, status=201)


@router.post("/tokens/{token_id}/revoke")
def token_revoke(request: Request, token_id: Id, user: Viewer) -> Response:
    try:
        info = revoke_token(request.app.state.db, token_id, actor=user.name, owner=None if user.is_admin else user.name)
    except TokenError as exc:
        if getattr(exc, "status", 400) == 404:
            raise HTTPException(404, str(exc)) from None
        flash(request, str(exc), "error")
        return back("/tokens")
    flash(request, f"Token {info.name!r} ({info.prefix}…) revoked.")
    return back("/tokens")

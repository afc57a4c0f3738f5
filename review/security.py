"""Who is asking, may they, and did the request come from our own page (CSRF).

Sessions are Starlette's signed cookie (itsdangerous, HttpOnly, SameSite=Lax). The session holds the user id, a
fingerprint of the account (a password or role change ends old sessions) and the CSRF token.

CSRF: every POST / PUT / PATCH / DELETE must carry the session's token, in the ``X-CSRF-Token`` header (the
gallery's JavaScript) or a ``csrf_token`` form field (plain forms). The check is a dependency of the whole app
(:func:`csrf_guard`), not of single routes, so a new route cannot forget it.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import HTTPException, Request

from review.auth import has_role, session_fingerprint
from storage.review_schema import User

__all__ = ["CurrentUser", "LoginRequired", "csrf_guard", "csrf_token", "current_user", "optional_user", "require_role",
           "start_session"]

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class CurrentUser:
    id: int
    name: str
    role: str

    @property
    def can_review(self) -> bool:
        return has_role(self.role, "reviewer")

    @property
    def is_admin(self) -> bool:
        return has_role(self.role, "admin")


class LoginRequired(Exception):
    """Raised for an anonymous request; pages answer with a redirect to the sign-in page, the API with 401."""

    def __init__(self, next_url: str):
        self.next_url = next_url


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (the sign-in page needs one before anyone has signed in)."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def csrf_guard(request: Request) -> None:
    if request.method not in UNSAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            # Starlette caches the parsed form on the request, so the route's own Form() parameters still work.
            form = await request.form()
            value = form.get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    if not expected or not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise HTTPException(status_code=403, detail="missing or invalid CSRF token; reload the page and try again")


def start_session(request: Request, user: User) -> None:
    """A fresh session for a signed-in user: a new CSRF token too, so a token planted before sign-in is useless."""
    request.session.clear()
    request.session.update({"uid": user.id, "fp": session_fingerprint(user), "csrf": secrets.token_urlsafe(32)})


def optional_user(request: Request) -> CurrentUser | None:
    uid = request.session.get("uid")
    if uid is None:
        return None
    cache = getattr(request.state, "user", None)
    if cache is not None:
        return cache
    db = request.app.state.db
    with db.session() as s:
        user = s.get(User, uid)
        ok = user is not None and not user.disabled and hmac.compare_digest(session_fingerprint(user), request.session.get("fp", ""))
        current = CurrentUser(user.id, user.name, user.role) if ok else None
    if current is None:
        request.session.clear()  # deleted, disabled or password changed: the old cookie is worthless now
        return None
    request.state.user = current
    return current


def current_user(request: Request) -> CurrentUser:
    user = optional_user(request)
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(quote(target, safe="/?=&"))
    return user


def require_role(needed: str):
    """Dependency factory: the signed-in user, if their role is ``needed`` or stronger; 403 otherwise."""

    def dependency(request: Request) -> CurrentUser:
        user = current_user(request)
        if not has_role(user.role, needed):
            raise HTTPException(status_code=403, detail=f"this needs the {needed} role; you are signed in as {user.role}")
        return user

    return dependency

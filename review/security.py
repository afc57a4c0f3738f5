"""Who is asking, may they, and did the request come from our own page (CSRF).

Sessions: Starlette's signed cookie (itsdangerous, HttpOnly, SameSite=Lax) holds a random session token, a
fingerprint of the account and the CSRF token; the ``sessions`` table holds the token's sha256 and is checked on
every request (:mod:`review.sessions`), so signing out or an account change ends a session even if its cookie
was copied.

CSRF: every POST / PUT / PATCH / DELETE must carry the session's token, in the ``X-CSRF-Token`` header (the
gallery's JavaScript) or a ``csrf_token`` form field (plain forms). The header is checked before the route runs
(:class:`review.middleware.SignedInGate`, which also turns away unsigned requests before their body is read); the
form field by :func:`csrf_guard`, a dependency of the whole app, so a new route cannot forget it.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import HTTPException, Request

from review.auth import has_role, session_fingerprint
from review.sessions import open_session, revoke_session, session_user
from storage.review_schema import User

__all__ = ["CurrentUser", "LoginRequired", "client_address", "csrf_guard", "csrf_matches", "csrf_token", "current_user",
           "end_session", "optional_user", "require_role", "start_session"]

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


CSRF_REFUSED = "missing or invalid CSRF token; reload the page and try again"


def is_form(content_type: str) -> bool:
    return content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data"))


def csrf_matches(session: dict, sent: object) -> bool:
    expected = session.get("csrf")
    return bool(isinstance(expected, str) and expected and isinstance(sent, str) and sent
                and hmac.compare_digest(sent.encode(), expected.encode()))


async def csrf_guard(request: Request) -> None:
    if request.method not in UNSAFE_METHODS:
        return
    if request.scope.get("state", {}).get("api_token") is not None:
        return  # a verified bearer token (review.api_auth): no cookie authenticates it, so no CSRF is possible
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and is_form(request.headers.get("content-type", "")):
        # The route's Form() parameters were parsed already (FastAPI reads the body before dependencies), within
        # the body cap and the form limits; Starlette caches the form on the request.
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not csrf_matches(request.session, sent):
        raise HTTPException(status_code=403, detail=CSRF_REFUSED)


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def start_session(request: Request, user: User) -> None:
    """A fresh session for a signed-in user: a new token (row in ``sessions``) and a new CSRF token, so a token
    planted before sign-in is useless."""
    old = request.session.get("sid")
    if isinstance(old, str):
        revoke_session(request.app.state.db, old)
    token = open_session(request.app.state.db, user.id, hours=request.app.state.config.session_hours,
                         address=client_address(request))
    request.session.clear()
    request.session.update({"sid": token, "fp": session_fingerprint(user), "csrf": secrets.token_urlsafe(32)})


def end_session(request: Request) -> None:
    token = request.session.get("sid")
    if isinstance(token, str):
        revoke_session(request.app.state.db, token)
    request.session.clear()


def optional_user(request: Request) -> CurrentUser | None:
    token = request.session.get("sid")
    if not isinstance(token, str):
        return None
    cache = getattr(request.state, "user", None)
    if cache is not None:
        return cache
    with request.app.state.db.session() as s:
        user = session_user(s, token)
        # The fingerprint also catches a role or password changed straight in the database (no revocation then).
        ok = user is not None and hmac.compare_digest(session_fingerprint(user), str(request.session.get("fp", "")))
        current = CurrentUser(user.id, user.name, user.role) if ok else None
    if current is None:
        request.session.clear()  # signed out, revoked, expired or the account changed: the cookie is worthless now
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

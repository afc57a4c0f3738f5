"""REST API tokens: ``Authorization: Bearer adf_...`` acts as its user, capped by its scopes and the user's role.

The token text is ``adf_`` + 32 random bytes (url-safe base64), shown once; only its sha256 is stored (a leaked
database does not leak usable tokens, and a random 256-bit secret needs no slow hash). ``prefix`` (the first 8
characters) is what lists show. Scopes: ``read`` (GET everything the user may see) or ``read submit`` (also start
and cancel runs). A viewer's token can never submit; a disabled or removed user's tokens stop working at once.
Created and revoked by the user for themselves or by an admin for anyone (``adforge tokens``, the web's token
page, ``/api/v1/tokens``); both are audited.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import asdict, dataclass

from sqlalchemy import select, update

from review.auth import has_role
from storage.database import Database, audit
from storage.review_schema import ApiToken, User
from storage.schema import utcnow

__all__ = ["SCOPES", "TOKEN_PREFIX", "TokenError", "TokenInfo", "TokenUser", "create_token", "list_tokens",
           "revoke_token", "token_owner", "verify_token"]

TOKEN_PREFIX = "adf_"
SCOPES = {"read": ("read",), "submit": ("read", "submit")}
_TOKEN = re.compile(r"adf_[A-Za-z0-9_-]{20,100}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
# last_used_at is written at most this often per token: a busy script must not turn every GET into a write.
_TOUCH_SECONDS = 60


class TokenError(ValueError):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_token_request"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    created_by: str
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scopes"] = list(self.scopes)
        for k in ("created_at", "revoked_at", "last_used_at"):
            d[k] = iso(d[k])
        return d


@dataclass(frozen=True)
class TokenUser:
    """Who a valid token acts as."""

    token_id: int
    user_id: int
    name: str
    role: str
    scopes: tuple[str, ...]


def iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    t = t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)  # SQLite keeps no zone: UTC written
    return t.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _info(t: ApiToken, user: str) -> TokenInfo:
    return TokenInfo(id=t.id, user=user, name=t.name, prefix=t.prefix, scopes=tuple(t.scopes.split()),
                     created_at=t.created_at, created_by=t.created_by, revoked_at=t.revoked_at,
                     last_used_at=t.last_used_at)


def _live_user(s, name: str) -> User:
    from review.auth import REMOVED

    user = s.scalar(select(User).where(User.name == name))
    if user is None or user.password_hash == REMOVED:
        raise TokenError(f"no user {name!r}", 404, "not_found")
    if user.disabled:
        raise TokenError(f"user {name!r} is disabled", 409, "user_disabled")
    return user


def create_token(db: Database, user_name: str, name: str, scope: str, *, actor: str) -> tuple[str, TokenInfo]:
    """A new token for ``user_name``; returns (the token text, shown once, and its record)."""
    if scope not in SCOPES:
        raise TokenError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}", 422, "invalid_scope")
    if not _NAME.fullmatch(name or ""):
        raise TokenError("token name: 1-64 printable characters", 422, "invalid_name")
    with db.session() as s:
        user = _live_user(s, user_name)
        if "submit" in SCOPES[scope] and not has_role(user.role, "reviewer"):
            raise TokenError(f"{user_name} is a {user.role}: their tokens can only read (scope 'read')", 403,
                             "forbidden_scope")
        text = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = ApiToken(user_id=user.id, name=name, prefix=text[:8], token_hash=_hash(text),
                         scopes=" ".join(SCOPES[scope]), created_by=actor)
        s.add(token)
        s.flush()
        # Never the token or its hash in the audit log: the log is kept forever and read by many.
        audit(s, actor=actor, action="token.created", entity="api_token", entity_id=token.id,
              after={"user": user_name, "name": name, "prefix": token.prefix, "scopes": token.scopes})
        return text, _info(token, user_name)


def list_tokens(db: Database, *, user_name: str | None = None, include_revoked: bool = True) -> list[TokenInfo]:
    with db.session() as s:
        query = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id)
        if user_name is not None:
            query = query.where(User.name == user_name)
        if not include_revoked:
            query = query.where(ApiToken.revoked_at.is_(None))
        return [_info(t, u) for t, u in s.execute(query)]


def token_owner(db: Database, token_id: int) -> str | None:
    with db.session() as s:
        return s.scalar(select(User.name).join(ApiToken, ApiToken.user_id == User.id).where(ApiToken.id == token_id))


def revoke_token(db: Database, token_id: int, *, actor: str, owner: str | None = None) -> TokenInfo:
    """Revoke a token (idempotent: revoking a revoked token changes nothing). ``owner``: only that user's tokens
    may be revoked (a non-admin on the web), any other id answers "no such token"."""
    with db.session() as s:
        row = s.execute(select(ApiToken, User.name).join(User, User.id == ApiToken.user_id)
                        .where(ApiToken.id == token_id)).first()
        if row is None or (owner is not None and row[1] != owner):
            raise TokenError(f"no token {token_id}", 404, "not_found")
        token, user = row
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            audit(s, actor=actor, action="token.revoked", entity="api_token", entity_id=token.id,
                  before={"user": user, "name": token.name, "prefix": token.prefix, "revoked": False},
                  after={"revoked": True})
        return _info(token, user)


def verify_token(db: Database, text: str) -> TokenUser | None:
    """The user a bearer token acts as, or None (unknown, revoked, malformed, user disabled or removed)."""
    if not _TOKEN.fullmatch(text or ""):
        return None
    from review.auth import REMOVED

    digest = _hash(text)
    with db.session() as s:
        row = s.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                        .where(ApiToken.token_hash == digest)).first()
        if row is None:
            return None
        token, user = row
        if token.revoked_at is not None or user.disabled or user.password_hash == REMOVED:
            return None
        now = utcnow()
        last = token.last_used_at
        if last is None or (now - (last if last.tzinfo else last.replace(tzinfo=dt.timezone.utc))).total_seconds() > _TOUCH_SECONDS:
            s.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
        scopes = tuple(token.scopes.split())
        if not has_role(user.role, "reviewer"):  # a viewer (or a demoted user) reads, whatever the token says
            scopes = tuple(x for x in scopes if x == "read")
        return TokenUser(token_id=token.id, user_id=user.id, name=user.name, role=user.role, scopes=scopes)

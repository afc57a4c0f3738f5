"""Server-side sessions: the cookie carries a random token, the ``sessions`` table its sha256.

A row is valid while it is not revoked, not expired and its user is enabled; every request checks it. Signing
out revokes the row; a password or role change, disabling or removing a user revoke all of that user's rows, so a
cookie copied before any of these stops working at once (a signed cookie alone stays valid until it expires).
Only the hash is stored: a copy of the table does not let anyone sign in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from storage.database import Database
from storage.review_schema import SessionRecord, User
from storage.schema import utcnow

__all__ = ["open_session", "revoke_session", "revoke_user_sessions", "session_user", "token_id"]

# Expired and revoked rows are kept this long (who was signed in from where), then deleted at the next sign-in.
KEEP_ENDED = dt.timedelta(days=30)


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def open_session(db: Database, user_id: int, *, hours: int, address: str | None) -> str:
    """A new session for ``user_id``; returns the token for the cookie (never stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with db.session() as s:
        s.execute(delete(SessionRecord).where(SessionRecord.expires_at < now - KEEP_ENDED))
        s.add(SessionRecord(id=token_id(token), user_id=user_id, created_at=now, expires_at=now + dt.timedelta(hours=hours),
                            address=(address or "")[:64] or None))
    return token


def session_user(s: Session, token: str) -> User | None:
    """The user of a live session (not revoked, not expired, user enabled), else None."""
    if not token or len(token) > 200:  # ours are 43 characters; anything else is not worth hashing
        return None
    return s.scalar(
        select(User).join(SessionRecord, SessionRecord.user_id == User.id)
        .where(SessionRecord.id == token_id(token), SessionRecord.revoked_at.is_(None),
               SessionRecord.expires_at > utcnow(), User.disabled.is_(False))
    )


def revoke_session(db: Database, token: str) -> None:
    with db.session() as s:
        s.execute(update(SessionRecord).where(SessionRecord.id == token_id(token), SessionRecord.revoked_at.is_(None))
                  .values(revoked_at=utcnow()))


def revoke_user_sessions(s: Session, user_id: int) -> int:
    """Revoke every live session of a user, in the caller's transaction; returns how many were live."""
    result = s.execute(update(SessionRecord).where(SessionRecord.user_id == user_id, SessionRecord.revoked_at.is_(None))
                       .values(revoked_at=utcnow()))
    return result.rowcount or 0

"""Gallery users: argon2id password hashes (argon2-cffi), roles, sign-in checks.

Roles, weakest first: ``viewer`` (reads everything, changes nothing), ``reviewer`` (review actions, re-render
requests, results imports), ``admin`` (also the campaign's review settings). Users are added with
``adforge users add``; names are lower-case words so that they never look like the ``system:`` / ``cli:`` actors
other writers put in the audit log.
"""

from __future__ import annotations

import functools
import hashlib
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from storage.database import Database, audit
from storage.review_schema import ROLES, User
from storage.schema import utcnow

__all__ = ["AuthError", "add_user", "authenticate", "has_role", "list_users", "session_fingerprint", "validate_name"]

MIN_PASSWORD = 8
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


@functools.cache
def _dummy_hash() -> str:
    # Verified against when the user does not exist, so that a wrong name takes as long as a wrong password.
    return _hasher.hash("not a password anyone has")


class AuthError(ValueError):
    pass


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise AuthError(f"invalid user name {name!r}: use 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")
    return name


def has_role(role: str, needed: str) -> bool:
    """Whether ``role`` is ``needed`` or stronger."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def session_fingerprint(user: User) -> str:
    """Stored in the session cookie: changing the password (or role) changes it and so ends old sessions."""
    return hashlib.sha256(f"{user.id}:{user.role}:{user.password_hash}".encode()).hexdigest()[:24]


def add_user(db: Database, name: str, role: str, password: str, *, actor: str) -> User:
    validate_name(name)
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password must have at least {MIN_PASSWORD} characters")
    try:
        with db.session() as s:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise AuthError(f"user {name!r} exists already")
            user = User(name=name, role=role, password_hash=_hasher.hash(password))
            s.add(user)
            s.flush()
            # The hash never goes into the audit log: it is a secret, and the log cannot be edited afterwards.
            audit(s, actor=actor, action="user.added", entity="user", entity_id=user.id, after={"name": name, "role": role})
            return user
    except IntegrityError:  # a parallel add of the same name
        raise AuthError(f"user {name!r} exists already") from None


def list_users(db: Database) -> list[User]:
    with db.session() as s:
        return list(s.scalars(select(User).order_by(User.name)))


def authenticate(db: Database, name: str, password: str) -> User | None:
    """The user if ``name`` / ``password`` match an enabled account, else None; records the sign-in."""
    with db.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        try:
            _hasher.verify(user.password_hash if user else _dummy_hash(), password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled:
            return None
        if _hasher.check_needs_rehash(user.password_hash):  # parameters got stronger since it was hashed
            user.password_hash = _hasher.hash(password)
        user.last_login_at = utcnow()
        audit(s, actor=user.name, action="user.signed_in", entity="user", entity_id=user.id)
        return user

"""Gallery users: argon2id password hashes (argon2-cffi), roles, sign-in checks.

Roles, weakest first: ``viewer`` (reads everything, changes nothing), ``reviewer`` (review actions, re-render
requests, results imports), ``admin`` (also the campaign's review settings). Users are managed with ``adforge users
add / passwd / role / disable / enable / remove`` (each audited; a password or role change, disabling or removing
ends the user's sessions); names are lower-case words so that they never look like the ``system:`` / ``cli:``
actors other writers put in the audit log.
"""

from __future__ import annotations

import functools
import hashlib
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from review.sessions import revoke_user_sessions
from storage.database import Database, audit
from storage.review_schema import ROLES, SignInAttempt, User
from storage.schema import utcnow

__all__ = ["AuthError", "REMOVED", "add_user", "authenticate", "find_user", "has_role", "list_users", "record_sign_in",
           "remove_user", "session_fingerprint", "set_disabled", "set_password", "set_role", "validate_name", "verify"]

MIN_PASSWORD = 8
# The password hash of a removed user: no argon2 hash looks like this (PHC strings start with "$"), so it never
# verifies, and it marks the row as removed without a schema change.
REMOVED = "!removed"
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


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    return role


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password must have at least {MIN_PASSWORD} characters")
    return password


def add_user(db: Database, name: str, role: str, password: str, *, actor: str) -> User:
    validate_name(name)
    _check_role(role)
    _check_password(password)
    try:
        with db.session() as s:
            found = s.scalar(select(User).where(User.name == name))
            if found is not None and found.password_hash == REMOVED:
                # The audit log names people by these names: a reused name would mix two people's decisions.
                raise AuthError(f"user {name!r} was removed; names are not reused, so choose another")
            if found is not None:
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


def verify(s: Session, name: str, password: str) -> tuple[User | None, str]:
    """(the user, "") if ``name`` / ``password`` match an enabled account, else (the user or None, why not). A wrong
    name costs as much time as a wrong password."""
    user = s.scalar(select(User).where(User.name == name))
    stored = user.password_hash if user is not None and user.password_hash != REMOVED else _dummy_hash()
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return user, "unknown user" if user is None else "removed" if user.password_hash == REMOVED else "wrong password"
    if user is None or user.password_hash == REMOVED:
        return user, "unknown user" if user is None else "removed"
    if user.disabled:
        return user, "disabled"
    return user, ""


def record_sign_in(s: Session, user: User, password: str) -> None:
    if _hasher.check_needs_rehash(user.password_hash):  # parameters got stronger since it was hashed
        user.password_hash = _hasher.hash(password)
    user.last_login_at = utcnow()
    user.locked_until = None
    audit(s, actor=user.name, action="user.signed_in", entity="user", entity_id=user.id)


def authenticate(db: Database, name: str, password: str) -> User | None:
    """The user if ``name`` / ``password`` match an enabled account, else None; records the sign-in. No limits:
    the gallery signs in through :func:`review.signin.sign_in`, which adds them."""
    with db.session() as s:
        user, why = verify(s, name, password)
        if why:
            return None
        record_sign_in(s, user, password)
        return user


# ------------------------------------------------------------------------------------------------ managing users


def find_user(s: Session, name: str) -> User:
    """A user that exists and was not removed, for changing it; AuthError otherwise."""
    user = s.scalar(select(User).where(User.name == name).with_for_update())
    if user is None or user.password_hash == REMOVED:
        raise AuthError(f"no user {name!r}" + (" (it was removed)" if user is not None else ""))
    return user


def set_password(db: Database, name: str, password: str, *, actor: str) -> int:
    """A new password; ends the user's sessions. Returns how many sessions were ended."""
    _check_password(password)
    with db.session() as s:
        user = find_user(s, name)
        user.password_hash = _hasher.hash(password)
        ended = revoke_user_sessions(s, user.id)
        audit(s, actor=actor, action="user.password_changed", entity="user", entity_id=user.id,
              after={"name": name, "sessions_ended": ended})
        return ended


def set_role(db: Database, name: str, role: str, *, actor: str) -> int:
    """A new role; ends the user's sessions (a demoted user must not keep the old role in an open tab)."""
    _check_role(role)
    with db.session() as s:
        user = find_user(s, name)
        if user.role == role:
            return 0
        before = user.role
        user.role = role
        ended = revoke_user_sessions(s, user.id)
        audit(s, actor=actor, action="user.role_changed", entity="user", entity_id=user.id,
              before={"role": before}, after={"role": role, "sessions_ended": ended})
        return ended


def set_disabled(db: Database, name: str, disabled: bool, *, actor: str) -> bool:
    """Disable (ends the user's sessions) or enable (also lifts a sign-in lock). Returns whether anything changed."""
    with db.session() as s:
        user = find_user(s, name)
        if disabled:
            if user.disabled:
                return False
            user.disabled = True
            ended = revoke_user_sessions(s, user.id)
            audit(s, actor=actor, action="user.disabled", entity="user", entity_id=user.id,
                  after={"name": name, "sessions_ended": ended})
            return True
        locked = user.locked_until
        if not user.disabled and locked is None:
            return False
        user.disabled, user.locked_until = False, None
        # The failures behind a lock would lock the name again at the next mistake; the audit log keeps them.
        s.execute(delete(SignInAttempt).where(SignInAttempt.name == name, SignInAttempt.succeeded.is_(False)))
        audit(s, actor=actor, action="user.enabled", entity="user", entity_id=user.id,
              after={"name": name, "lock_lifted": locked is not None})
        return True


def remove_user(db: Database, name: str, *, actor: str) -> int:
    """Remove a user: sessions ended, password gone, the row kept (marked removed) so that the audit log's entries
    by this name keep pointing at one person and the name is never given to someone else."""
    with db.session() as s:
        user = find_user(s, name)
        ended = revoke_user_sessions(s, user.id)
        before = {"name": name, "role": user.role, "disabled": user.disabled}
        user.password_hash, user.disabled, user.locked_until = REMOVED, True, None
        audit(s, actor=actor, action="user.removed", entity="user", entity_id=user.id, before=before,
              after={"sessions_ended": ended})
        return ended

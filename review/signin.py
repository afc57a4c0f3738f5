"""Signing in to the gallery with limits: per name and per address, from the ``sign_in_attempts`` table.

* A name with ``account_failures`` failures within ``failure_window_minutes`` is locked for ``lock_minutes`` after
  the last of them. The rule is computed from the attempts alone, so a name that belongs to nobody locks exactly
  like a real account: the answers tell an attacker nothing about which names exist. A real account also gets
  ``users.locked_until`` set (what ``adforge users list`` shows; ``adforge users enable`` lifts it).
* An address with ``address_failures`` failures within the window is refused until they age out. Those refusals
  are not recorded (the failures that caused them are), so the block ends on its own and a flood writes nothing.
* Every failure is recorded and written to the audit log as ``user.sign_in_failed`` with the name as typed (cut),
  the address and why; a refusal for a locked name counts as a failure of that address too.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from review.auth import record_sign_in, verify
from review.config import GalleryConfig
from storage.database import Database, audit
from storage.review_schema import SignInAttempt, User
from storage.schema import utcnow

__all__ = ["SignInResult", "WRONG", "sign_in"]

WRONG = "Wrong name or password."
ADDRESS_REFUSED = "Too many failed sign-ins from this address; try again later."
NAME_LEN = 64  # the column's length; a longer name is cut for the records (it names no user anyway)
KEEP_ATTEMPTS = dt.timedelta(days=1)  # rows older than every window are dropped now and then
_SCAN = 500  # failures looked at per name: far more than any lock rule needs


@dataclass(frozen=True)
class SignInResult:
    user: User | None
    status: int  # 200 signed in, 401 wrong, 429 refused by a limit
    message: str
    retry_after: int = 0  # seconds, for 429


def _aware(when: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored is UTC.
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _lock_end(s: Session, name: str, now: dt.datetime, cfg: GalleryConfig) -> dt.datetime | None:
    """Until when ``name`` is locked by its failures (None: not locked), the same for any name."""
    window, lock = dt.timedelta(minutes=cfg.failure_window_minutes), dt.timedelta(minutes=cfg.lock_minutes)
    since = s.scalar(select(func.max(SignInAttempt.at)).where(SignInAttempt.name == name, SignInAttempt.succeeded.is_(True)))
    start = now - lock - window  # a failure before this cannot hold a lock that lasts until now
    if since is not None and _aware(since) > start:
        start = _aware(since)
    times = sorted(_aware(t) for t in s.scalars(
        select(SignInAttempt.at).where(SignInAttempt.name == name, SignInAttempt.succeeded.is_(False), SignInAttempt.at > start)
        .order_by(SignInAttempt.at.desc()).limit(_SCAN)))
    n, end = cfg.account_failures, None
    for i in range(n - 1, len(times)):
        if times[i] - times[i - n + 1] < window:  # the n-th failure within the window: locked from here
            end = times[i] + lock
    return end


def _address_blocked(s: Session, address: str, now: dt.datetime, cfg: GalleryConfig) -> bool:
    since = now - dt.timedelta(minutes=cfg.failure_window_minutes)
    failures = s.scalar(select(func.count()).select_from(SignInAttempt).where(
        SignInAttempt.address == address, SignInAttempt.succeeded.is_(False), SignInAttempt.at > since))
    return failures >= cfg.address_failures


def _failed(s: Session, user: User | None, name: str, address: str, reason: str, cfg: GalleryConfig) -> dt.datetime | None:
    """Record a failure (attempt row + audit entry); returns the name's lock end after it, if locked."""
    now = utcnow()
    s.add(SignInAttempt(at=now, name=name, address=address, succeeded=False))
    s.flush()
    audit(s, actor="anonymous", action="user.sign_in_failed", entity="user", entity_id=user.id if user else "",
          after={"name": name, "address": address, "reason": reason})
    end = _lock_end(s, name, now, cfg)
    if user is not None and end is not None and end > now:
        user.locked_until = end
    if random.random() < 1 / 64:  # keep the table small without a job that has to be scheduled
        s.execute(delete(SignInAttempt).where(SignInAttempt.at < now - KEEP_ATTEMPTS))
    return end if end is not None and end > now else None


def _locked(end: dt.datetime, now: dt.datetime) -> SignInResult:
    seconds = max(1, math.ceil((end - now).total_seconds()))
    minutes = math.ceil(seconds / 60)
    return SignInResult(None, 429, f"Too many failed sign-ins for this name; try again in {minutes} minute"
                                   f"{'' if minutes == 1 else 's'}.", seconds)


def sign_in(db: Database, typed_name: str, password: str, *, address: str | None, config: GalleryConfig) -> SignInResult:
    name = typed_name.strip()[:NAME_LEN]
    address = (address or "unknown")[:64]
    now = utcnow()
    with db.session() as s:
        if _address_blocked(s, address, now, config):
            return SignInResult(None, 429, ADDRESS_REFUSED, config.failure_window_minutes * 60)
        user = s.scalar(select(User).where(User.name == name))
        end = _lock_end(s, name, now, config)
        if user is not None and user.locked_until is not None and (end is None or _aware(user.locked_until) > end):
            end = _aware(user.locked_until)
        if end is not None and end > now:
            # Checked before the password: while locked, even the right password does not get in (and costs no hash).
            _failed(s, user, name, address, "locked", config)
            return _locked(end, now)
        found, why = verify(s, typed_name.strip(), password) if len(typed_name.strip()) <= NAME_LEN else (None, "unknown user")
        if why:
            end = _failed(s, found, name, address, why, config)
            return _locked(end, utcnow()) if end is not None else SignInResult(None, 401, WRONG)
        s.add(SignInAttempt(at=utcnow(), name=name, address=address, succeeded=True))
        record_sign_in(s, found, password)
        return SignInResult(found, 200, "")

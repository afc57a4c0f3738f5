"""Accounts and sessions: sign-in limits per name and per address (the same for names that exist and names that
do not), failed sign-ins in the audit log, server-side sessions that logout and account changes revoke."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from review.app import create_app
from review.auth import AuthError, add_user, authenticate, remove_user, set_disabled, set_password, set_role
from review.sessions import token_id
from storage.assets import open_store
from storage.database import open_database
from storage.review_schema import SessionRecord, SignInAttempt, User
from storage.schema import AuditEntry
from tests.review.world import PASSWORD, Browser, World, audit_entries, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")


@pytest.fixture
def site(db_url: str, tmp_path: Path) -> Iterator[tuple[World, FastAPI]]:
    """On SQLite and PostgreSQL: the limits are queries over timestamps."""
    db = open_database(db_url)
    store_url = str(tmp_path / "assets")
    world = build_world(db, open_store(store_url), store_url)
    app = create_app(db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs")
    yield world, app
    app.state.db.dispose()
    db.dispose()


def attempt(b: Browser, name: str, password: str):
    r = b.post_form("/login", {"name": name, "password": password, "next": "/"})
    return r.status_code, _error(r.text)


def _error(html: str) -> str:
    m = re.search(r'id="login-error">([^<]*)<', html)
    return m.group(1) if m else ""


def age_attempts(world: World, minutes: int) -> None:
    """Move every recorded attempt (and lock) ``minutes`` into the past, as if that much time went by."""
    delta = dt.timedelta(minutes=minutes)
    with world.db.session() as s:
        for a in s.scalars(select(SignInAttempt)):
            a.at = a.at - delta
        for u in s.scalars(select(User).where(User.locked_until.is_not(None))):
            u.locked_until = u.locked_until - delta


# ------------------------------------------------------------------------------------------------ sign-in limits


def test_five_failures_lock_a_name_whether_or_not_it_exists(site) -> None:
    w, app = site
    b = Browser(app)
    real = [attempt(b, "rita", "wrong-password") for _ in range(5)]
    ghost = [attempt(b, "nobody", "wrong-password") for _ in range(5)]
    assert real == ghost  # the answers tell nothing about which names exist
    assert real[:4] == [(401, "Wrong name or password.")] * 4
    assert real[4] == (429, "Too many failed sign-ins for this name; try again in 15 minutes.")
    # Locked: even the right password is refused, without saying so.
    assert attempt(b, "rita", PASSWORD) == real[4]
    with w.db.session() as s:
        locked = s.scalar(select(User.locked_until).where(User.name == "rita"))
    assert locked is not None
    # Other names are not affected, and the lock ends on its own.
    assert attempt(b, "vic", PASSWORD)[0] == 303
    age_attempts(w, 16)
    assert attempt(Browser(app), "rita", PASSWORD)[0] == 303
    with w.db.session() as s:
        assert s.scalar(select(User.locked_until).where(User.name == "rita")) is None


def test_failed_sign_ins_are_audited_with_the_name_as_typed_and_the_address(site) -> None:
    w, app = site
    b = Browser(app, address="203.0.113.9")
    attempt(b, "rita", "wrong-password")
    attempt(b, "x" * 5000, "wrong-password")
    attempt(b, "vic", PASSWORD)
    failed = audit_entries(w.db, action="user.sign_in_failed")
    assert [(e.actor, e.after) for e in failed] == [
        ("anonymous", {"name": "rita", "address": "203.0.113.9", "reason": "wrong password"}),
        ("anonymous", {"name": "x" * 64, "address": "203.0.113.9", "reason": "unknown user"}),
    ]
    assert failed[0].entity_id == str(_user_id(w, "rita")) and failed[1].entity_id == ""
    with w.db.session() as s:
        rows = [(a.name, a.address, a.succeeded) for a in s.scalars(select(SignInAttempt).order_by(SignInAttempt.id))]
    assert rows == [("rita", "203.0.113.9", False), ("x" * 64, "203.0.113.9", False), ("vic", "203.0.113.9", True)]


def test_twenty_failures_from_one_address_refuse_that_address(site) -> None:
    w, app = site
    attacker, other = Browser(app, address="198.51.100.7"), Browser(app, address="198.51.100.8")
    for i in range(20):  # four tries each for five names: no name gets locked
        assert attempt(attacker, f"name{i % 5}", "guess")[0] == 401
    refused = (429, "Too many failed sign-ins from this address; try again later.")
    assert attempt(attacker, "rita", PASSWORD) == refused
    r = attacker.post_form("/login", {"name": "rita", "password": PASSWORD})
    assert r.headers["retry-after"] == "900"
    # Refusals of a blocked address are not recorded: it does not block itself for longer, and a flood writes nothing.
    assert len(audit_entries(w.db, action="user.sign_in_failed")) == 20
    assert attempt(other, "rita", PASSWORD)[0] == 303
    age_attempts(w, 16)
    assert attempt(attacker, "rita", PASSWORD)[0] == 303


def test_enable_lifts_a_lock(site) -> None:
    w, app = site
    b = Browser(app)
    for _ in range(5):
        attempt(b, "rita", "wrong-password")
    assert attempt(b, "rita", PASSWORD)[0] == 429
    assert set_disabled(w.db, "rita", False, actor="cli:admin") is True
    assert attempt(b, "rita", PASSWORD)[0] == 303
    assert audit_entries(w.db, action="user.enabled")[0].after == {"name": "rita", "lock_lifted": True}


# ------------------------------------------------------------------------------------------------ sessions


def _user_id(w: World, name: str) -> int:
    with w.db.session() as s:
        return s.scalar(select(User.id).where(User.name == name))


def test_a_cookie_copied_before_logout_stops_working(site) -> None:
    w, app = site
    rita = Browser(app, "rita")
    copy = TestClient(app, follow_redirects=False, cookies={"adforge_session": rita.client.cookies["adforge_session"]})
    assert copy.get("/").status_code == 200
    with w.db.session() as s:
        rows = list(s.scalars(select(SessionRecord).where(SessionRecord.user_id == _user_id(w, "rita"))))
    assert len(rows) == 1 and len(rows[0].id) == 64 and rows[0].revoked_at is None and rows[0].address == "testclient"
    assert rita.post_form("/logout").status_code == 303
    assert copy.get("/").status_code == 303  # the copy is signed out too
    assert copy.get("/api/variants/1").status_code == 401
    with w.db.session() as s:
        assert s.get(SessionRecord, rows[0].id).revoked_at is not None


def test_the_cookie_holds_a_token_whose_hash_is_the_row(site) -> None:
    import base64
    import json

    w, app = site
    rita = Browser(app, "rita")
    payload = rita.client.cookies["adforge_session"].split(".")[0]
    session = json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))
    assert set(session) == {"sid", "fp", "csrf"}
    with w.db.session() as s:
        row = s.get(SessionRecord, token_id(session["sid"]))
        assert row is not None and row.user_id == _user_id(w, "rita")
        assert s.scalar(select(SessionRecord).where(SessionRecord.id == session["sid"])) is None  # never the token


@pytest.mark.parametrize("change", ["password", "role", "disable", "remove"])
def test_account_changes_revoke_every_session(site, change: str) -> None:
    w, app = site
    tabs = [Browser(app, "rita"), Browser(app, "rita")]
    ada = Browser(app, "ada")
    assert all(t.get("/").status_code == 200 for t in tabs)
    ended = {"password": lambda: set_password(w.db, "rita", "a new password!", actor="cli:admin"),
             "role": lambda: set_role(w.db, "rita", "viewer", actor="cli:admin"),
             "disable": lambda: set_disabled(w.db, "rita", True, actor="cli:admin"),
             "remove": lambda: remove_user(w.db, "rita", actor="cli:admin")}[change]()
    assert ended in (2, True)
    assert all(t.get("/").status_code == 303 for t in tabs)
    assert ada.get("/").status_code == 200  # only rita's sessions
    action = {"password": "user.password_changed", "role": "user.role_changed", "disable": "user.disabled",
              "remove": "user.removed"}[change]
    [entry] = audit_entries(w.db, action=action)
    assert entry.actor == "cli:admin" and entry.entity_id == str(_user_id(w, "rita"))
    assert "password_hash" not in str(entry.after) and "argon2" not in str(entry.after)


def test_an_expired_session_is_over(site) -> None:
    w, app = site
    rita = Browser(app, "rita")
    with w.db.session() as s:
        s.execute(update(SessionRecord).values(expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)))
    assert rita.get("/").status_code == 303


def test_removing_a_user_keeps_the_audit_log_and_the_name(site) -> None:
    w, app = site
    vid = w.variants[("hero-01", "instagram_square")][0]
    rita = Browser(app, "rita")
    assert rita.review(vid, status="approved").status_code == 200
    before = [(e.id, e.actor, e.action) for e in audit_entries(w.db)]
    remove_user(w.db, "rita", actor="cli:admin")
    after = [(e.id, e.actor, e.action) for e in audit_entries(w.db)]
    assert after[:len(before)] == before and after[-1][2] == "user.removed"  # appended, nothing changed
    assert authenticate(w.db, "rita", PASSWORD) is None
    assert attempt(Browser(app), "rita", PASSWORD) == (401, "Wrong name or password.")
    with pytest.raises(AuthError, match="was removed; names are not reused"):
        add_user(w.db, "rita", "viewer", "another password", actor="cli:admin")
    for undo in (lambda: set_disabled(w.db, "rita", False, actor="x"), lambda: set_password(w.db, "rita", "whatever1", actor="x")):
        with pytest.raises(AuthError, match="no user 'rita' \\(it was removed\\)"):
            undo()
    with w.db.session() as s:
        assert s.scalar(select(AuditEntry).where(AuditEntry.actor == "rita", AuditEntry.action == "review.approved"))

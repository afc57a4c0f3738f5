"""``adforge tokens create / list / revoke`` on a real database: the token is printed once and works against the
API until revoked; creating and revoking are audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from review.auth import add_user
from review.tokens import verify_token
from storage.database import open_database
from tests.review.world import audit_entries

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")
runner = CliRunner()


def test_create_list_revoke(tmp_path: Path, sqlite_db_url: str) -> None:
    db = open_database(sqlite_db_url)
    try:
        add_user(db, "rita", "reviewer", "correct horse battery", actor="test")
        add_user(db, "vic", "viewer", "correct horse battery", actor="test")
        res = runner.invoke(app, ["tokens", "create", "rita", "--name", "dam", "--scope", "submit", "--db", sqlite_db_url])
        assert res.exit_code == 0, res.output
        token = res.output.strip().splitlines()[-1]
        assert token.startswith("adf_") and verify_token(db, token).scopes == ("read", "submit")
        res = runner.invoke(app, ["tokens", "create", "vic", "--scope", "submit", "--db", sqlite_db_url])
        assert res.exit_code == 2 and "can only read" in res.output
        res = runner.invoke(app, ["tokens", "list", "--db", sqlite_db_url])
        assert res.exit_code == 0 and "rita" in res.output and token[:8] in res.output and token not in res.output
        res = runner.invoke(app, ["tokens", "revoke", "1", "--db", sqlite_db_url])
        assert res.exit_code == 0 and "revoked" in res.output
        assert verify_token(db, token) is None
        assert "revoked" in runner.invoke(app, ["tokens", "list", "--db", sqlite_db_url]).output
        res = runner.invoke(app, ["tokens", "revoke", "99", "--db", sqlite_db_url])
        assert res.exit_code == 2 and "no token 99" in res.output
        assert [e.action for e in audit_entries(db, entity="api_token")] == ["token.created", "token.revoked"]
        assert all(token not in str(e.after) for e in audit_entries(db, entity="api_token"))
    finally:
        db.dispose()

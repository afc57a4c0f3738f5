"""Migration 0011 (submissions, API tokens, ``runs.submission_id``) upgrades a 0010 database in place: existing runs
keep their rows with no submission, the new tables take rows, and the downgrade removes them again. On SQLite and
PostgreSQL (the ``db_url`` fixture skips PostgreSQL with a message where it is unreachable)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from storage.database import open_database
from tests.helpers import alembic_step


def _columns(db, table: str) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns(table)}


def test_upgrade_from_0010_adds_submissions_tokens_and_the_run_link(db_url: str) -> None:
    db = open_database(db_url, upgrade=False)
    try:
        alembic_step(db, command.upgrade, "0010")
        assert "submission_id" not in _columns(db, "runs")
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO runs (id, brief_path, status, settings, counts, timings, started_at) "
                              "VALUES (1, 'b.csv', 'completed', '{}', '{}', '{}', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO users (id, name, role, password_hash, disabled, created_at) "
                              "VALUES (1, 'rita', 'reviewer', 'x', false, CURRENT_TIMESTAMP)"))
        alembic_step(db, command.upgrade, "0011")
        assert db.revision() == "0011"
        assert {"submissions", "api_tokens"} <= set(inspect(db.engine).get_table_names())
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT id, submission_id FROM runs")).all() == [(1, None)]
            conn.execute(text("INSERT INTO api_tokens (id, user_id, name, prefix, token_hash, scopes, created_at, "
                              "created_by) VALUES (1, 1, 't', 'adf_abcd', :h, 'read', CURRENT_TIMESTAMP, 'test')"),
                         {"h": "a" * 64})
            conn.execute(text("INSERT INTO submissions (id, brief_name, brief_sha256, brief_path, options, plan, "
                              "submitted_by, token_id, idempotency_key, status, backend, created_at) VALUES (1, 'b.csv', "
                              ":h, '/b/b.csv', '{}', '{}', 'rita', 1, 'k1', 'queued', 'local', CURRENT_TIMESTAMP)"),
                         {"h": "b" * 64})
            conn.execute(text("UPDATE runs SET submission_id = 1 WHERE id = 1"))
        alembic_step(db, command.downgrade, "0010")
        assert "submission_id" not in _columns(db, "runs")
        assert not {"submissions", "api_tokens"} & set(inspect(db.engine).get_table_names())
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM runs")).scalars().all() == [1]
    finally:
        db.dispose()

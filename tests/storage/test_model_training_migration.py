"""Migration 0006 (``models.training``) upgrades a 0005 database in place and keeps its rows, on SQLite and
PostgreSQL (the ``db_url`` fixture skips PostgreSQL with a message where it is unreachable)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from storage.database import open_database
from tests.helpers import alembic_step




def _columns(db) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns("models")}


def test_upgrade_from_0005_adds_the_training_column(db_url: str) -> None:
    db = open_database(db_url, upgrade=False)
    try:
        alembic_step(db, command.upgrade, "0005")
        assert "training" not in _columns(db)
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO models (name, path, sha256, short_hash, family, kind, license_source, registered_at) "
                              "VALUES ('m', '/m', :sha, 'abcdef1234', 'sd1', 'checkpoint', 'registered', CURRENT_TIMESTAMP)"),
                         {"sha": "a" * 64})
        alembic_step(db, command.upgrade, "0006")
        assert db.revision() == "0006" and "training" in _columns(db)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name, training FROM models")).all() == [("m", None)]
            conn.execute(text("UPDATE models SET training = :t"), {"t": '{"trainer":"lora"}'})
            conn.commit()
        alembic_step(db, command.downgrade, "0005")
        assert "training" not in _columns(db)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM models")).scalars().all() == ["m"]
    finally:
        db.dispose()

"""Migration 0006 (``models.training``) upgrades a 0005 database in place and keeps its rows, on SQLite and
PostgreSQL (the ``db_url`` fixture skips PostgreSQL with a message where it is unreachable)."""

from __future__ import annotations

import os

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from storage.database import MIGRATIONS, open_database


def _alembic(db, action, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        action(cfg, revision)


def _columns(db) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns("models")}


def test_upgrade_from_0005_adds_the_training_column(db_url: str) -> None:
    db = open_database(db_url, upgrade=False)
    try:
        _alembic(db, command.upgrade, "0005")
        assert "training" not in _columns(db)
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO models (name, path, sha256, short_hash, family, kind, license_source, registered_at) "
                              "VALUES ('m', '/m', :sha, 'abcdef1234', 'sd1', 'checkpoint', 'registered', CURRENT_TIMESTAMP)"),
                         {"sha": "a" * 64})
        _alembic(db, command.upgrade, "0006")
        assert db.revision() == "0006" and "training" in _columns(db)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name, training FROM models")).all() == [("m", None)]
            conn.execute(text("UPDATE models SET training = :t"), {"t": '{"trainer":"lora"}'})
            conn.commit()
        _alembic(db, command.downgrade, "0005")
        assert "training" not in _columns(db)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM models")).scalars().all() == ["m"]
    finally:
        db.dispose()

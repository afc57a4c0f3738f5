"""Migration 0009 (``variants.fast``) upgrades a 0008 database in place: every existing variant is exact (""), keeps
its row, and its identity is still the one its spec computes. On SQLite and PostgreSQL (the ``db_url`` fixture skips
PostgreSQL with a message where it is unreachable)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from storage.database import open_database
from tests.helpers import alembic_step




def _columns(db) -> set[str]:
    return {c["name"] for c in inspect(db.engine).get_columns("variants")}


_ROWS = [
    "INSERT INTO models (id, name, path, sha256, short_hash, family, kind, license_source, registered_at) "
    "VALUES (1, 'm', '/m', :sha, 'abcdef1234', 'sd1', 'checkpoint', 'registered', CURRENT_TIMESTAMP)",
    "INSERT INTO campaigns (id, name, created_at) VALUES (1, 'c', CURRENT_TIMESTAMP)",
    "INSERT INTO briefs (id, sha256, file_name, columns, first_seen) VALUES (1, :sha, 'b.csv', '{}', CURRENT_TIMESTAMP)",
    "INSERT INTO brief_rows (id, brief_id, campaign_id, row_key, line, data) VALUES (1, 1, 1, 'r1', 2, '{}')",
    "INSERT INTO prompts (id, row_id, channel, template, variation_index, prompt, negative_prompt) "
    "VALUES (1, 1, 'banner', 'banner', 0, 'a cat', '')",
    "INSERT INTO variants (id, identity, row_id, prompt_id, model_id, channel, variant_index, seed, sampler, steps, "
    "cfg_scale, clip_skip, gen_width, gen_height, out_width, out_height, out_format, postprocess, storage_key, status, "
    "created_at) VALUES (1, :identity, 1, 1, 1, 'banner', 0, 7, 'Euler', 20, 7.0, 1, 64, 64, 1200, 628, 'jpeg', "
    "'cover-lanczos(1200x628)', 'c/r1/banner/v00.jpg', 'done', CURRENT_TIMESTAMP)",
]


def test_upgrade_from_0008_adds_the_fast_column_exact_for_every_variant(db_url: str) -> None:
    from storage.variants import load_variants

    db = open_database(db_url, upgrade=False)
    try:
        alembic_step(db, command.upgrade, "0008")
        assert "fast" not in _columns(db)
        with db.engine.begin() as conn:
            for statement in _ROWS:
                conn.execute(text(statement), {"sha": "a" * 64, "identity": "b" * 64})
        alembic_step(db, command.upgrade, "0009")
        assert db.revision() == "0009" and "fast" in _columns(db)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT id, fast FROM variants")).all() == [(1, "")]
        with db.session() as s:
            assert load_variants(s, [1])[1].spec.fast == ""
        alembic_step(db, command.downgrade, "0008")
        assert "fast" not in _columns(db)
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT identity FROM variants")).scalars().all() == ["b" * 64]
    finally:
        db.dispose()

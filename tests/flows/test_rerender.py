"""The gallery's re-render queue, drained by `adforge rerender` (flows/rerender.py) through the real flow."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flows.campaign import campaign_run
from cli.app import app
from flows.rerender import rerender_queue
from review.actions import queue_rerender
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.review_schema import RerenderRequest
from storage.schema import Asset, AuditEntry, Variant

pytestmark = pytest.mark.usefixtures("campaign_caches")


def test_queued_rerenders_are_rendered_once_and_identical_settings_reuse_the_asset(
    tmp_path: Path, campaign_model: Path, sqlite_db_url: str
) -> None:
    brief = tmp_path / "brief.csv"
    brief.write_text("campaign,row_id,subject,channels,variants\nc1,r1,a red circle,instagram_square,2\n")
    overrides = {"db_url": sqlite_db_url, "store_url": str(tmp_path / "assets"), "model": str(campaign_model), "steps": 2}
    campaign_run(str(brief), overrides=overrides)
    db = open_database(sqlite_db_url)
    with db.session() as s:
        source = s.scalars(select(Variant).order_by(Variant.id)).first()
    new_seed, _ = queue_rerender(db, source.id, actor="alice", overrides={"seed": 12345, "steps": 3})
    same, _ = queue_rerender(db, source.id, actor="alice")
    again, is_new = queue_rerender(db, source.id, actor="bob", overrides={"seed": 12345, "steps": 3})
    assert not is_new and again == new_seed  # the same waiting request is not queued twice

    result = rerender_queue(overrides=overrides)
    assert result["counts"] == {"rendered": 1, "reused": 1, "failed": 0}
    with db.session() as s:
        requests = {r.id: r for r in s.scalars(select(RerenderRequest))}
        assert {r.status for r in requests.values()} == {"done"}
        assert requests[same].result_variant_id == source.id
        made = s.get(Variant, requests[new_seed].result_variant_id)
        assert (made.seed, made.steps, made.row_id, made.prompt_id, made.channel) == (12345, 3, source.row_id, source.prompt_id, source.channel)
        assert made.status == "done" and made.identity != source.identity and made.storage_key != source.storage_key
        asset = s.scalars(select(Asset).where(Asset.variant_id == made.id)).one()
        assert s.scalar(select(func.count(Asset.id))) == 3
        actions = set(s.scalars(select(AuditEntry.action)))
        assert {"variant.rerender_requested", "variant.planned", "rerender.done", "asset.stored"} <= actions
    data = (tmp_path / "assets" / asset.storage_key).read_bytes()
    _, _, params = parse_infotext(read_image_metadata(data)[0])
    assert params["Seed"] == "12345" and params["Steps"] == "3"

    # Nothing left: a second drain does nothing; the CLI says so.
    out = CliRunner().invoke(app, ["rerender", "--db", sqlite_db_url, "--store", str(tmp_path / "assets")])
    assert out.exit_code == 0, out.output
    assert "rendered 0, already existed 0, failed 0" in out.output
    db.dispose()

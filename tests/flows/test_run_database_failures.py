"""A campaign run whose database fails: a damaged file before the run, a full disk in the middle of it. The run
ends with one line naming the database, is not retried in vain, and is not left 'running' once the database
works again."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, select

import flows.campaign as campaign
from flows.campaign import campaign_run, open_resources, set_progress_listener
from flows.recording import mark_crashed_runs
from flows.settings import load_settings
from storage.database import DatabaseError, open_database, sqlite_url
from storage.schema import Run

pytestmark = pytest.mark.usefixtures("campaign_caches")

BRIEF = "campaign,row_id,subject,channels,variants\n" + "".join(
    f"full,row-{i},a {colour} circle,instagram_square,8\n" for i, colour in enumerate(("red", "blue")))


def _overrides(tmp_path: Path, model: Path) -> dict:
    # One engine batch of 16: its record (16 assets, 16 audit entries) needs pages the full database cannot add.
    return {"db_url": sqlite_url(tmp_path / "adforge.db"), "store_url": str(tmp_path / "assets"), "model": str(model),
            "steps": 1, "batch_size": 16}


def test_a_corrupt_database_file_fails_the_run_in_one_line(tmp_path: Path, campaign_model: Path) -> None:
    brief = tmp_path / "full.csv"
    brief.write_text(BRIEF)
    (tmp_path / "adforge.db").write_bytes(b"\x00garbage" * 4096)
    overrides = _overrides(tmp_path, campaign_model)
    with pytest.raises(DatabaseError) as info:
        campaign_run(str(brief), overrides=overrides)
    assert str(info.value) == f"cannot open database {overrides['db_url']}: file is not a database"


def test_a_full_disk_mid_run_fails_it_once_and_it_is_not_left_running(tmp_path: Path, campaign_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    brief = tmp_path / "full.csv"
    brief.write_text(BRIEF)
    overrides = _overrides(tmp_path, campaign_model)
    url = overrides["db_url"]
    settings = load_settings(overrides)
    state: dict = {}

    def cap(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {state['pages']}")

    def fill_the_disk(event_name: str, count: int) -> None:
        if event_name != "planned":
            return
        db, _ = open_resources(settings)  # the run's own engine: from now on it cannot grow the file
        with db.engine.connect() as conn:
            state["pages"] = conn.exec_driver_sql("PRAGMA page_count").scalar()
        event.listen(db.engine, "connect", cap)
        db.engine.dispose()
        state["engine"] = db.engine

    renders = []
    real_render = campaign.render_variants

    def counting_render(*args, **kw):
        renders.append(1)
        return real_render(*args, **kw)

    monkeypatch.setattr(campaign, "render_variants", counting_render)
    set_progress_listener(fill_the_disk)
    try:
        with pytest.raises(DatabaseError) as info:
            campaign_run(str(brief), overrides=overrides)
    finally:
        set_progress_listener(None)
    assert str(info.value) == f"database {url}: database or disk is full"
    assert len(renders) == 1  # the render task was not retried: a full disk stays full

    # The disk has room again: the run is failed (recorded at its end, or by the next look at this host's runs).
    event.remove(state["engine"], "connect", cap)
    state["engine"].dispose()
    db = open_database(url)
    mark_crashed_runs(db)
    with db.session() as s:
        [run] = s.scalars(select(Run)).all()
        assert run.status == "failed" and "database or disk is full" in (run.error or "")
    db.dispose()
    summary = campaign_run(str(brief), overrides=overrides)
    assert summary["status"] == "completed" and summary["counts"]["rendered"] == 16

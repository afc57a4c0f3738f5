"""Two runs of one brief at once: each variant is claimed by one run in one atomic update, rendered once, and the
other run reports it skipped, not rendered. On SQLite and PostgreSQL, with separate connections per run."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

import flows.rendering as rendering
from engine.pipeline import Pipeline
from flows.campaign import PlannedRun, close_resources, plan_run, validate_brief
from flows.counts import RenderCounts
from flows.recording import abandon_run, claim_variants, finish_run, mark_crashed_runs, release_claims
from flows.rendering import clear_pipelines, render_variants
from flows.settings import Settings, load_settings
from storage.assets import open_store
from storage.database import open_database
from storage.schema import AuditEntry, Run, Variant

BRIEF = "campaign,row_id,subject,channels,variants\n" + "".join(
    f"race,row-{i},a {colour} circle,instagram_square,8\n" for i, colour in enumerate(("red", "blue")))
VARIANTS = 16


@pytest.fixture
def fresh_resources():
    yield
    close_resources()
    clear_pipelines()


def _plan(tmp_path: Path, db_url: str, model: Path) -> tuple[Settings, PlannedRun]:
    brief = tmp_path / "race.csv"
    if not brief.exists():
        brief.write_text(BRIEF)
    settings = load_settings({"db_url": db_url, "store_url": str(tmp_path / "assets"), "model": str(model), "steps": 1,
                              "batch_size": 4})
    return settings, plan_run.fn(validate_brief.fn(str(brief), False, None), settings, False, None)


def _ids(planned: PlannedRun) -> list[int]:
    return sorted(i for batch in planned.batches for i in batch)


def test_claims_are_exclusive_until_released_or_the_run_ends(tmp_path: Path, db_url: str, campaign_model: Path,
                                                           fresh_resources) -> None:
    _, first = _plan(tmp_path, db_url, campaign_model)
    _, second = _plan(tmp_path, db_url, campaign_model)
    ids = _ids(first)
    assert ids == _ids(second) and len(ids) == VARIANTS  # the same brief: the same variants
    db = open_database(db_url)
    try:
        got = claim_variants(db, first.run_id, ids[:10])
        assert (got.mine, got.elsewhere, got.done) == (ids[:10], {}, [])
        assert claim_variants(db, first.run_id, ids[:10]).mine == ids[:10]  # a retried task keeps its claim
        other = claim_variants(db, second.run_id, ids)
        assert other.mine == ids[10:] and other.elsewhere == {i: first.run_id for i in ids[:10]}
        release_claims(db, first.run_id, ids[:5])
        with db.session() as s:
            s.execute(update(Variant).where(Variant.id == ids[5]).values(status="done"))
        again = claim_variants(db, second.run_id, ids)
        assert again.mine == ids[:5] + ids[10:] and again.done == [ids[5]] and set(again.elsewhere) == set(ids[6:10])
        # A claim of a run that is no longer running (finished, failed, crashed) is void.
        finish_run(db, first.run_id, "failed", {}, {}, "boom")
        assert claim_variants(db, second.run_id, ids).mine == [i for i in ids if i != ids[5]]
    finally:
        db.dispose()


def test_concurrent_claims_from_separate_connections_split_the_variants(tmp_path: Path, db_url: str,
                                                                       campaign_model: Path, fresh_resources) -> None:
    runs = [_plan(tmp_path, db_url, campaign_model)[1] for _ in range(3)]
    ids = _ids(runs[0])
    dbs = [open_database(db_url, upgrade=False) for _ in runs]
    for round_ in range(3):
        barrier = threading.Barrier(len(runs))
        results: dict[int, list[int]] = {}

        def claim(k: int) -> None:
            barrier.wait()
            results[k] = claim_variants(dbs[k], runs[k].run_id, ids).mine

        threads = [threading.Thread(target=claim, args=(k,)) for k in range(len(runs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = [i for k in results for i in results[k]]
        assert sorted(got) == ids, f"round {round_}: every variant claimed exactly once: {results}"
        for k, run in enumerate(runs):
            release_claims(dbs[k], run.run_id, results[k])
    for db in dbs:
        db.dispose()


def test_two_runs_at_once_render_each_variant_once(tmp_path: Path, db_url: str, campaign_model: Path,
                                                   monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                   fresh_resources) -> None:
    """The probe: two runs of one brief started together rendered all 16 images twice and both reported them as
    rendered. Now each render_variants call (the path of a task, a device worker and the re-render queue) claims
    first: together they render 16, and the other 16 are reported skipped."""
    settings, first = _plan(tmp_path, db_url, campaign_model)
    _, second = _plan(tmp_path, db_url, campaign_model)
    barrier = threading.Barrier(2)
    real_claim = rendering.claim_variants

    def claim_together(*args, **kw):  # both runs reach their claim at the same moment
        barrier.wait(60)
        return real_claim(*args, **kw)

    monkeypatch.setattr(rendering, "claim_variants", claim_together)
    generated: list[int] = []
    lock = threading.Lock()
    real_generate = Pipeline.generate

    def generate(self, requests, *args, **kw):  # one pipeline object serves both threads: one call at a time
        with lock:
            generated.append(len(requests))
            return real_generate(self, requests, *args, **kw)

    monkeypatch.setattr(Pipeline, "generate", generate)
    counts: dict[int, RenderCounts] = {}

    def render(planned: PlannedRun) -> None:
        db, store = open_database(db_url, upgrade=False), open_store(settings.store_url)
        try:
            counts[planned.run_id] = render_variants(_ids(planned), db=db, store=store, run_id=planned.run_id,
                                                     device="cpu", batch_size=4)
        finally:
            db.dispose()

    threads = [threading.Thread(target=render, args=(p,)) for p in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(counts) == {first.run_id, second.run_id}
    assert sum(c.rendered for c in counts.values()) == VARIANTS
    assert sum(c.skipped for c in counts.values()) == VARIANTS
    assert sum(generated) == VARIANTS  # no image made twice
    # They claimed at the same moment, so whatever one run skipped, the other was rendering then: it says so.
    for run, c in counts.items():
        if c.skipped:
            assert any(m.startswith(f"run {run}: skipping") and "being rendered by another run" in m
                       for m in (r.getMessage() for r in caplog.records)), run
    db = open_database(db_url, upgrade=False)
    with db.session() as s:
        stored = Counter(s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "asset.stored")))
        assert len(stored) == VARIANTS and max(stored.values()) == 1
        assert s.scalar(select(func.count(Variant.id)).where(Variant.claim_run_id.is_not(None))) == 0  # released
    db.dispose()


def test_a_run_whose_end_was_not_recorded_is_marked_failed_by_the_next(tmp_path: Path, campaign_model: Path,
                                                                       sqlite_db_url: str, fresh_resources) -> None:
    _, first = _plan(tmp_path, sqlite_db_url, campaign_model)
    abandon_run(first.run_id, "database sqlite:///x.db: database or disk is full")
    db = open_database(sqlite_db_url)
    try:
        assert mark_crashed_runs(db) == [first.run_id]
        with db.session() as s:
            run = s.get(Run, first.run_id)
            assert (run.status, run.error) == ("failed", "database sqlite:///x.db: database or disk is full")
        assert mark_crashed_runs(db) == []
    finally:
        db.dispose()

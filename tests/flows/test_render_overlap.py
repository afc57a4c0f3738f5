"""Delivery of batch k on a background thread while batch k+1 renders (flows/delivery.py): the same files, byte for
byte, the same database rows in the same order and the same counts as one batch after the other; a delivery that
raises stops the render once the work in flight has ended, with no thread left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

import flows.delivery as delivery
import flows.rendering as rendering
from flows.campaign import close_resources, plan_run, validate_brief
from flows.counts import STAGES
from flows.rendering import clear_pipelines, get_pipeline, load_jobs, render_jobs, render_variants
from flows.settings import Settings, load_settings
from storage.assets import open_store
from storage.database import open_database, sqlite_url
from storage.schema import Asset, AuditEntry, Variant
from tests.helpers import templates_with_channels

# ov_hires: a chain whose hires fix is engine work; ov_capped: a PNG cap no image meets (one failure per variant,
# in the delivery); instagram_square with the example kit: an overlay and its clean copy.
CHANNELS = """  ov_plain:
    width: 80
    height: 80
    format: jpeg
    max_kb: 512
    description: overlap test
  ov_hires:
    width: 96
    height: 96
    format: jpeg
    max_kb: 512
    description: overlap test
    upscale: "hires(scale=2, denoise=0.4, steps=1) -> fit(96x96)"
  ov_capped:
    width: 256
    height: 256
    format: png
    max_kb: 1
    description: overlap test
"""
BRIEF = """campaign,row_id,subject,channels,variants,tagline,brand
overlap,row-0,a red circle,"ov_plain, ov_hires",5,,
overlap,row-1,a blue square,ov_capped,3,,
overlap,row-2,a green dot,instagram_square,2,Fresh for spring,acme
"""
BATCH = 2


@pytest.fixture
def fresh_resources():
    yield
    close_resources()
    clear_pipelines()


def _planned(tmp_path: Path, model: Path, name: str) -> tuple[Settings, int, list[list[int]]]:
    folder = tmp_path / name
    folder.mkdir()
    templates = templates_with_channels(folder, CHANNELS)
    brief = folder / "overlap.csv"
    brief.write_text(BRIEF)
    settings = load_settings({"db_url": sqlite_url(folder / "adforge.db"), "store_url": str(folder / "assets"),
                              "model": str(model), "steps": 2, "batch_size": BATCH, "templates_dir": str(templates)},
                             env={})
    planned = plan_run.fn(validate_brief.fn(str(brief), False, str(templates)), settings, False, None)
    close_resources()
    return settings, planned.run_id, planned.batches


def _render(settings: Settings, run_id: int, batches: list[list[int]], events: list) -> rendering.RenderCounts:
    db, store = open_database(settings.db_url), open_store(settings.store_url)
    try:
        total = rendering.RenderCounts()
        for ids in batches:
            total += render_variants(ids, db=db, store=store, run_id=run_id, device="cpu", batch_size=BATCH,
                                     templates_dir=settings.templates_dir,
                                     on_event=lambda e, n: events.append((e, n, threading.current_thread().name)))
        return total
    finally:
        db.dispose()


def _rows(settings: Settings) -> dict[str, list[tuple]]:
    """Every row, in id order, without clocks and the folders' paths (the store's URLs, the run's settings)."""
    db = open_database(settings.db_url)
    try:
        with db.session() as s:
            assets = [(a.id, a.variant_id, a.run_id, a.storage_key, a.sha256, a.size_bytes, a.format, a.width, a.height,
                       a.infotext, a.product_error, a.product_changed, a.product_outline, a.clean_key, a.overlay)
                      for a in s.scalars(select(Asset).order_by(Asset.id))]
            variants = [(v.id, v.identity, v.status, v.error) for v in s.scalars(select(Variant).order_by(Variant.id))]
            audit = [(e.id, e.action, e.entity, e.entity_id, e.run_id, e.before,
                      None if e.action == "run.started" else {k: v for k, v in (e.after or {}).items() if k != "url"})
                     for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]  # run.started: the folders
    finally:
        db.dispose()
    return {"assets": assets, "variants": variants, "audit": audit}


def _files(settings: Settings) -> dict[str, bytes]:
    store = open_store(settings.store_url)
    return {key: store.get(key) for key in store.list()}


def _delivery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("adforge-delivery")]


def test_overlap_writes_the_same_files_rows_and_counts(tmp_path: Path, campaign_model: Path, fresh_resources,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_request = rendering.RenderJob.request

    def request(job, *args, **kwargs):  # one variant fails in the engine part (recorded by its batch's delivery)
        if job.spec.channel == "ov_hires" and job.spec.variant_index == 1:
            raise ValueError("an unreadable record")
        return real_request(job, *args, **kwargs)

    monkeypatch.setattr(rendering.RenderJob, "request", request)
    results = {}
    for overlap in (False, True):
        monkeypatch.setattr(rendering, "OVERLAP", overlap)
        settings, run_id, batches = _planned(tmp_path, campaign_model, f"overlap-{overlap}")
        assert any(len(ids) > BATCH for ids in batches), "a render of one batch has nothing to overlap"
        events: list = []
        counts = _render(settings, run_id, batches, events)
        results[overlap] = counts, events, _files(settings), _rows(settings)
        assert not _delivery_threads()
    (c_off, e_off, f_off, r_off), (c_on, e_on, f_on, r_on) = results[False], results[True]
    # 9 + 2 delivered, 1 failed in the engine part and 3 at encoding (the cap), as without overlap.
    assert (c_on.rendered, c_on.failed, c_on.skipped) == (c_off.rendered, c_off.failed, c_off.skipped) == (11, 4, 0)
    assert set(c_on.seconds) == set(c_off.seconds) == {*STAGES, delivery.WAIT}
    assert f_on == f_off and len(f_on) == 11 + 2  # with the overlay's clean copies
    assert r_on == r_off
    assert [v[2] for v in r_on["variants"]].count("failed") == 4
    # The same events in the same order; with overlap, those of every batch but the last come from the delivery thread.
    assert [e[:2] for e in e_on] == [e[:2] for e in e_off]
    assert {e[2] for e in e_off} == {threading.current_thread().name}
    assert any(e[2].startswith("adforge-delivery") for e in e_on)


def _jobs(settings: Settings, batches: list[list[int]]):
    db = open_database(settings.db_url)
    ids = [i for ids in batches for i in ids]
    jobs = [j for j in load_jobs(db, ids) if j.spec.channel == "ov_plain"]
    pipe = get_pipeline(jobs[0].model.path, jobs[0].model.sha256, device="cpu", max_batch_size=BATCH)
    return db, open_store(settings.store_url), jobs, pipe


@pytest.mark.parametrize("overlap", [True, False])
def test_a_delivery_that_raises_stops_the_render(tmp_path: Path, campaign_model: Path, fresh_resources,
                                                 monkeypatch: pytest.MonkeyPatch, overlap: bool) -> None:
    """The database fails for good while the first batch is recorded: render_jobs raises that error once the batch
    rendering beside it has ended, delivers nothing more, and leaves no thread running."""
    settings, run_id, batches = _planned(tmp_path, campaign_model, "raises")
    db, store, jobs, pipe = _jobs(settings, batches)
    assert len(jobs) == 5

    calls: list[int] = []

    def failing_record(_db, _run_id, records) -> int:
        calls.append(len(records))
        raise RuntimeError("the database is gone")

    generated: list[int] = []
    real_generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda requests: generated.append(len(requests)) or real_generate(requests))
    monkeypatch.setattr(delivery, "record_assets", failing_record)
    try:
        with pytest.raises(RuntimeError, match="the database is gone"):
            render_jobs(jobs, pipeline=pipe, store=store, db=db, run_id=run_id, overlap=overlap)
    finally:
        db.dispose()
    assert calls == [BATCH]  # the first batch's records; the second batch was never delivered
    assert generated == ([BATCH, BATCH] if overlap else [BATCH])  # with overlap, the second rendered meanwhile
    assert not _delivery_threads()


def test_a_rendering_failure_lets_the_delivery_in_flight_finish(tmp_path: Path, campaign_model: Path, fresh_resources,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings, run_id, batches = _planned(tmp_path, campaign_model, "engine-raises")
    db, store, jobs, pipe = _jobs(settings, batches)
    real_batch = rendering._render_batch
    rendered: list[int] = []

    def second_fails(todo, *args):
        if rendered:
            raise KeyboardInterrupt  # not an engine error the batch records: it ends the render
        rendered.append(len(todo))
        return real_batch(todo, *args)

    monkeypatch.setattr(rendering, "_render_batch", second_fails)
    try:
        with pytest.raises(KeyboardInterrupt):
            render_jobs(jobs, pipeline=pipe, store=store, db=db, run_id=run_id, overlap=True)
        with db.session() as s:
            done = s.scalars(select(Variant.id).where(Variant.status == "done")).all()
    finally:
        db.dispose()
    assert sorted(done) == sorted(j.variant_id for j in jobs[:BATCH])  # the first batch was delivered in full
    assert not _delivery_threads()

"""Render workers on one machine (flows/device_pool.py) and out-of-memory halving (in the engine), on the CPU: two
CPU worker processes on the tiny campaign model stand in for two GPUs. Every image is real output of the engine."""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from engine.pipeline import GenerationRequest, Pipeline
from flows.campaign import PlannedRun, campaign_run, close_resources, plan_run, validate_brief
from flows.device_pool import DeviceError, DevicePool, PoolConfig, WorkerSpec, plan_workers
from flows.rendering import clear_pipelines, render_variants
from flows.settings import Settings, SettingsError, load_settings
from storage.assets import open_store
from storage.database import DatabaseError, open_database, sqlite_url
from storage.schema import Asset, AuditEntry, Variant
from tests.helpers import batched_device_with_latent_cap, cap_unet_latents

BRIEF = "campaign,row_id,subject,channels,variants\n" + "".join(
    f"pool,row-{i},a {colour} circle,instagram_square,5\n" for i, colour in enumerate(("red", "blue"))
)
VARIANTS = 2 * 5


# ------------------------------------------------------------------------------------------------ planning workers


def test_all_devices_is_one_pinned_worker_per_gpu_or_the_cpu() -> None:
    assert plan_workers("all", cuda_count=0, threads=4) == [WorkerSpec("cpu", "cpu", "", 4)]
    # Each GPU worker sees exactly one GPU (as cuda:0); threads are shared out so workers do not oversubscribe.
    assert plan_workers("all", cuda_count=2, visible=None, threads=16) == [
        WorkerSpec("cuda:0", "cuda:0", "0", 8), WorkerSpec("cuda:1", "cuda:0", "1", 8)]
    # Index N of this process's view is the N-th GPU it was given, not physical GPU N.
    assert [s.cuda_visible for s in plan_workers("cuda:0,cuda:1", cuda_count=2, visible="3,5", threads=2)] == ["3", "5"]
    assert [s.cuda_visible for s in plan_workers("all", cuda_count=2, visible="GPU-aa,GPU-bb", threads=2)] == ["GPU-aa", "GPU-bb"]


def test_auto_follows_the_single_device_setting_and_lists_repeat() -> None:
    assert plan_workers("auto", "auto", cuda_count=3, threads=3) == [
        WorkerSpec(f"cuda:{i}", "cuda:0", str(i), 1) for i in range(3)]
    [second] = plan_workers("auto", "cuda:1", cuda_count=3, threads=3)
    assert second == WorkerSpec("cuda:1", "cuda:0", "1", 3)
    assert second.here == "cuda:1"  # what a single device is called in the (unpinned) coordinator process
    assert plan_workers("auto", "cpu", cuda_count=3, threads=3) == [WorkerSpec("cpu", "cpu", "", 3)]
    assert plan_workers("cpu", cuda_count=2, threads=8) == [WorkerSpec("cpu", "cpu", "", 8)]
    assert plan_workers("cpu,cpu", cuda_count=0, threads=8) == [WorkerSpec("cpu#1", "cpu", "", 4), WorkerSpec("cpu#2", "cpu", "", 4)]
    assert plan_workers("cuda", cuda_count=1, threads=1) == [WorkerSpec("cuda:0", "cuda:0", "0", 1)]


def test_devices_this_machine_lacks_are_refused_by_name() -> None:
    with pytest.raises(DeviceError, match=r"device cuda:2 does not exist: 2 CUDA device\(s\) visible"):
        plan_workers("cuda:0,cuda:2", cuda_count=2)
    with pytest.raises(DeviceError, match=r"devices 'cuda:0' asks for cuda:0, but this machine has no CUDA GPU \(use --devices cpu\)"):
        plan_workers("cuda:0", cuda_count=0)


def test_devices_and_fan_out_settings_flag_over_env_over_file(tmp_path: Path) -> None:
    assert (load_settings(env={}, cwd=tmp_path).devices, load_settings(env={}, cwd=tmp_path).fan_out) == ("auto", 1)
    (tmp_path / "adforge.toml").write_text('devices = "cuda:0,cuda:1"\nfan_out = 3\n')
    s = load_settings(env={}, cwd=tmp_path)
    assert (s.devices, s.fan_out) == ("cuda:0,cuda:1", 3)
    env = {"ADFORGE_DEVICES": "cpu", "ADFORGE_FAN_OUT": "2"}
    s = load_settings(env=env, cwd=tmp_path)
    assert (s.devices, s.fan_out) == ("cpu", 2)
    s = load_settings({"devices": "all", "fan_out": 4}, env=env, cwd=tmp_path)
    assert (s.devices, s.fan_out) == ("all", 4)


def test_bad_devices_and_fan_out_name_the_setting_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^ADFORGE_FAN_OUT: 'fan_out' must be a whole number, got 'two'$"):
        load_settings(env={"ADFORGE_FAN_OUT": "two"}, cwd=tmp_path)
    with pytest.raises(SettingsError, match=r"^command line: 'fan_out' must be >= 1, got 0$"):
        load_settings({"fan_out": 0}, env={}, cwd=tmp_path)
    (tmp_path / "adforge.toml").write_text('devices = "cuda:0,gpu1"\n')
    with pytest.raises(SettingsError, match=r"adforge.toml: 'devices' has 'gpu1': use auto, all, cpu, cuda, cuda:N"):
        load_settings(env={}, cwd=tmp_path)
    with pytest.raises(SettingsError, match=r"^ADFORGE_DEVICES: 'devices' has an empty entry in 'cpu,'"):
        load_settings(env={"ADFORGE_DEVICES": "cpu,"}, cwd=tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------------ out of memory


def test_out_of_memory_halves_the_batch_and_keeps_the_images(campaign_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    requests = [GenerationRequest("a red circle", seed=s, width=64, height=64, steps=2) for s in range(4)]
    single = Pipeline.load(campaign_model, device="cpu", max_batch_size=1)
    expected = [r.image.tobytes() for r in single.generate(requests)]

    pipe = Pipeline.load(campaign_model, device="cpu", max_batch_size=4)
    pipe.batch_invariant = False  # images share network calls, as on a GPU
    cap = cap_unet_latents(2, pipe.models.unet)  # room for one image's CFG pair
    with caplog.at_level(logging.WARNING, logger="engine.pipeline"):
        got = pipe.generate(requests)
    assert [r.image.tobytes() for r in got] == expected
    assert [r.request.seed for r in got] == [0, 1, 2, 3]
    assert (pipe.fits, pipe.oom_halvings) == (1, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("out of memory on cpu rendering 4 image(s) in one call (")
    assert messages[0].endswith("halving to 2 and retrying")
    assert "halving to 1" in messages[1]
    # What fits is remembered: the next batch does not run into the wall first.
    assert len(pipe.generate(requests[:2])) == 2 and pipe.oom_halvings == 2
    # One image that does not fit is a real error (recorded against its variants), not an endless loop.
    cap.remove()
    cap_unet_latents(1, pipe.models.unet)
    with pytest.raises(torch.OutOfMemoryError, match="holds 1"):
        pipe.generate(requests[:1])


# ------------------------------------------------------------------------------------------------ the pool


@pytest.fixture
def fresh_resources():
    yield
    close_resources()
    clear_pipelines()


def _planned(tmp_path: Path, model: Path, name: str, batch_size: int = 2, steps: int = 6) -> tuple[Settings, PlannedRun, list[list[int]]]:
    """A brief planned and recorded in its own database and store (no Prefect needed)."""
    folder = tmp_path / name
    folder.mkdir()
    brief = folder / "pool.csv"
    brief.write_text(BRIEF)
    settings = load_settings({"db_url": sqlite_url(folder / "adforge.db"), "store_url": str(folder / "assets"),
                              "model": str(model), "steps": steps, "batch_size": batch_size})
    planned = plan_run.fn(validate_brief.fn(str(brief), False, None), settings, False, None)
    units = [b[i : i + batch_size] for b in planned.batches for i in range(0, len(b), batch_size)]
    return settings, planned, units


def _render_here(settings: Settings, planned: PlannedRun) -> None:
    """The single-process path: this process, one device."""
    db, store = open_database(settings.db_url), open_store(settings.store_url)
    for batch in planned.batches:
        render_variants(batch, db=db, store=store, run_id=planned.run_id, device="cpu", batch_size=settings.batch_size)
    db.dispose()


def _files(settings: Settings) -> dict[str, bytes]:
    store = open_store(settings.store_url)
    return {key: store.get(key) for key in store.list()}


def _rendered_once(settings: Settings, expected: int) -> None:
    """Every variant done with exactly one asset (and one 'stored' audit entry), one file each in the store."""
    db = open_database(settings.db_url)
    with db.session() as s:
        assert s.scalar(select(func.count(Variant.id)).where(Variant.status == "done")) == expected
        assert max(Counter(s.scalars(select(Asset.variant_id))).values()) == 1
        assert s.scalar(select(func.count(Asset.id))) == expected
        stored = Counter(s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "asset.stored")))
        assert len(stored) == expected and max(stored.values()) == 1
        keys = sorted(s.scalars(select(Asset.storage_key)))
    db.dispose()
    assert sorted(open_store(settings.store_url).list()) == keys


def _pool(settings: Settings, **kw) -> DevicePool:
    # threads=2 -> one torch thread per worker, as this process has (tests/conftest.py): same arithmetic, same bytes.
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, settings.batch_size)
    return DevicePool(plan_workers("cpu,cpu", threads=2), config, **kw)


def test_killed_worker_batch_goes_to_the_others(tmp_path: Path, campaign_model: Path, fresh_resources) -> None:
    """SIGKILL one worker while it renders a batch: the batch is re-queued, the run completes, nothing is doubled,
    and the files are byte for byte those of a single-process run."""
    settings, planned, units = _planned(tmp_path, campaign_model, "pool")
    events: list[tuple[str, str, int | None, int | None]] = []
    killed: dict[str, int] = {}

    def observer(event: str, worker: str, pid: int | None, unit: int | None) -> None:
        events.append((event, worker, pid, unit))
        if event == "started" and worker == "cpu#2" and not killed:
            killed.update(pid=pid, unit=unit)
            os.kill(pid, signal.SIGKILL)

    rendered: list[tuple[str, int]] = []
    with _pool(settings, observer=observer) as pool:
        result = pool.run(planned.run_id, units, on_event=lambda event, n: rendered.append((event, n)))
    assert killed, "worker cpu#2 never started a batch"
    assert (result.counts.rendered, result.counts.failed, result.counts.skipped, result.requeued) == (VARIANTS, 0, 0, 1)
    assert sum(n for event, n in rendered if event == "rendered") == VARIANTS
    assert ("died", "cpu#2", killed["pid"], killed["unit"]) in events
    assert ("requeued", "cpu#2", killed["pid"], killed["unit"]) in events
    [finisher] = [pid for event, _, pid, unit in events if event == "finished" and unit == killed["unit"]]
    assert finisher != killed["pid"]
    # Every unit finished exactly once, and both workers rendered some.
    assert sorted(unit for event, _, _, unit in events if event == "finished") == list(range(len(units)))
    _rendered_once(settings, VARIANTS)

    reference, ref_planned, _ = _planned(tmp_path, campaign_model, "reference")
    _render_here(reference, ref_planned)
    assert _files(settings) == _files(reference)


def test_out_of_memory_in_a_worker_halves_and_never_fails_the_run(tmp_path: Path, campaign_model: Path, fresh_resources,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A worker whose device holds one image per U-Net call (the test hook raises a real torch.OutOfMemoryError)
    gets batches of 2: it halves once (and keeps the smaller size), logs it through the coordinator, and renders
    what a batch size of 1 would. The worker is spawned, a fresh interpreter that pins its device before it imports
    torch, as GPU workers are."""
    settings, planned, units = _planned(tmp_path, campaign_model, "oom", steps=2)
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, settings.batch_size,
                        worker_init=functools.partial(batched_device_with_latent_cap, 2))
    with caplog.at_level(logging.WARNING), DevicePool(plan_workers("cpu", threads=1), config, start_method="spawn") as pool:
        result = pool.run(planned.run_id, units)
    assert (result.counts.rendered, result.counts.failed, result.counts.oom_halvings) == (VARIANTS, 0, 1)
    [halved] = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert halved.startswith("[render worker cpu] out of memory on cpu rendering 2 image(s) in one call ("
                             "latent cap 2: out of memory for a U-Net call on 4 latents")
    assert halved.endswith("halving to 1 and retrying")
    _rendered_once(settings, VARIANTS)

    reference, ref_planned, _ = _planned(tmp_path, campaign_model, "reference", batch_size=1, steps=2)
    _render_here(reference, ref_planned)
    assert _files(settings) == _files(reference)


def test_campaign_run_on_two_workers_equals_one_process(tmp_path: Path, campaign_model: Path, campaign_caches) -> None:
    """The Prefect flow with ``devices = "cpu,cpu"`` writes the same files, byte for byte, as with one device."""
    brief = tmp_path / "brief.csv"
    brief.write_text(BRIEF)
    summaries, stores = [], []
    for name, devices in (("one", "cpu"), ("two", "cpu,cpu")):
        stores.append(str(tmp_path / name / "assets"))
        overrides = {"db_url": sqlite_url(tmp_path / f"{name}.db"), "store_url": stores[-1], "model": str(campaign_model),
                     "steps": 2, "batch_size": 2, "devices": devices}
        summaries.append(campaign_run(str(brief), overrides=overrides))
    for summary in summaries:
        assert summary["status"] == "completed", summary
        assert (summary["counts"]["rendered"], summary["counts"]["failed"]) == (VARIANTS, 0)
    one, two = ({key: s.get(key) for key in s.list()} for s in map(open_store, stores))
    assert len(one) == VARIANTS and one == two


def _database_that_cannot_grow(pages: int) -> None:
    """A render worker's ``worker_init``: every database connection of this process cannot grow the file past
    ``pages`` (SQLite's max_page_count: SQLITE_FULL, as on a full disk)."""
    from sqlalchemy import Engine, event

    def cap(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    event.listen(Engine, "connect", cap)


def test_a_full_database_in_a_worker_is_one_line_naming_it(tmp_path: Path, campaign_model: Path, fresh_resources) -> None:
    """A worker whose database writes fail for good ends the pool with the database's name and reason, not a
    worker's traceback, and the batch is not handed to another worker to fail again."""
    settings, planned, units = _planned(tmp_path, campaign_model, "full", batch_size=VARIANTS, steps=1)
    db = open_database(settings.db_url)
    with db.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
    db.dispose()
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, settings.batch_size,
                        worker_init=functools.partial(_database_that_cannot_grow, pages))
    with pytest.raises(DatabaseError) as info, DevicePool(plan_workers("cpu", threads=1), config) as pool:
        pool.run(planned.run_id, units)
    assert str(info.value) == f"database {settings.db_url}: database or disk is full"

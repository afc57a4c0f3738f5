"""Overlap inside a device worker (flows/device_worker.py, flows/device_pool.py): a worker renders unit k+1 while
unit k is delivered. The same files, rows, counts and events as one unit at a time; the coordinator really hands a
worker its next unit before the first is done; a worker killed while holding two units (one delivering) loses
neither and doubles nothing; a unit lost beside a crashing one is not failed for it; a worker keeps its share of
the threads past ``Pipeline.load``."""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from flows.device_pool import DevicePool, PoolConfig, WorkerSpec, plan_workers
from flows.settings import Settings
from storage.database import open_database
from storage.schema import Variant
from tests.flows import test_device_pool as pool_tests
from tests.flows import test_render_overlap as overlap_tests

VARIANTS = pool_tests.VARIANTS
fresh_resources = pool_tests.fresh_resources

Event = tuple[str, str, "int | None", "int | None"]


def _units(batches: list[list[int]], size: int) -> list[list[int]]:
    return [ids[i : i + size] for ids in batches for i in range(0, len(ids), size)]


def _overlapped(events: list[Event]) -> bool:
    """Whether some worker was handed a unit while one it had been handed earlier was not finished."""
    held: dict[str, set[int | None]] = {}
    for event, worker, _, unit in events:
        if event == "dispatched":
            if held.get(worker):
                return True
            held.setdefault(worker, set()).add(unit)
        elif event in ("finished", "died"):
            held.get(worker, set()).discard(unit)
    return False


def test_overlap_writes_the_same_files_rows_counts_and_events(tmp_path: Path, campaign_model: Path,
                                                              fresh_resources) -> None:
    """One worker, overlap on and off, over a brief with a hires fix (engine work), a cap no PNG meets (failures in
    the delivery) and a brand overlay (clean copies): the same bytes, rows in the same order, the same counts and
    progress events. With overlap the coordinator hands out unit k+1 before unit k is done; without, never."""
    results = {}
    for overlap in (False, True):
        settings, run_id, batches = overlap_tests._planned(tmp_path, campaign_model, f"pool-overlap-{overlap}")
        units = _units(batches, overlap_tests.BATCH)
        events: list[Event] = []
        progress: list[tuple[str, int]] = []
        config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, overlap_tests.BATCH,
                            templates_dir=settings.templates_dir, overlap=overlap)
        with DevicePool(plan_workers("cpu", threads=1), config, observer=lambda *e: events.append(e)) as pool:
            result = pool.run(run_id, units, on_event=lambda event, n: progress.append((event, n)))
        results[overlap] = (result, events, progress, overlap_tests._files(settings), overlap_tests._rows(settings))
    (r_off, ev_off, p_off, f_off, rows_off), (r_on, ev_on, p_on, f_on, rows_on) = results[False], results[True]
    # 12 delivered (2 with an overlay, and its clean copy), 3 failed at encoding (the cap).
    assert (r_on.counts.rendered, r_on.counts.failed, r_on.counts.skipped) == (12, 3, 0)
    assert (r_off.counts.rendered, r_off.counts.failed, r_off.counts.skipped) == (12, 3, 0)
    assert f_on == f_off and len(f_on) == 12 + 2
    assert rows_on == rows_off
    assert p_on == p_off
    assert set(r_on.counts.seconds) == set(r_off.counts.seconds)
    assert r_on.units_per_worker == r_off.units_per_worker == {"cpu": len(units)}
    for events in (ev_on, ev_off):
        assert sorted(u for e, _, _, u in events if e == "finished") == list(range(len(units)))
    assert _overlapped(ev_on) and not _overlapped(ev_off)
    assert [e for e, *_ in ev_on].count("rendered") == len(units) and "rendered" not in [e for e, *_ in ev_off]


def _gated_records(gate: str) -> None:
    """A render worker's ``worker_init``: its deliveries record nothing until the file ``gate`` exists (or a minute
    has passed), so a unit is still delivering when the test kills its worker."""
    import flows.delivery as delivery

    real = delivery.record_assets

    def gated(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        return real(*args, **kwargs)

    delivery.record_assets = gated


def test_a_worker_killed_holding_two_units_loses_neither(tmp_path: Path, campaign_model: Path, fresh_resources) -> None:
    """SIGKILL a worker once it renders its second unit while its first is delivering (held before recording): both
    go back to the queue, another worker renders them, every variant has one asset and one file, the counts add up
    once per unit, and the files are byte for byte those of a single-process run."""
    settings, planned, units = pool_tests._planned(tmp_path, campaign_model, "pool")
    gate = tmp_path / "gate"
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, settings.batch_size,
                        worker_init=functools.partial(_gated_records, str(gate)))
    events: list[Event] = []
    killed: dict = {}

    def observer(event: str, worker: str, pid: int | None, unit: int | None) -> None:
        events.append((event, worker, pid, unit))
        if event == "started" and worker == "cpu#2" and not killed:
            mine = [u for e, w, p, u in events if p == pid and e == "rendered"]
            if mine:  # its earlier unit is delivering (held at the gate): it holds two
                killed.update(pid=pid, units={*mine, unit})
                os.kill(pid, signal.SIGKILL)
                gate.touch()

    rendered: list[tuple[str, int]] = []
    with DevicePool(plan_workers("cpu,cpu", threads=2), config, observer=observer) as pool:
        result = pool.run(planned.run_id, units, on_event=lambda event, n: rendered.append((event, n)))
    assert killed and len(killed["units"]) == 2, events
    assert (result.counts.rendered, result.counts.failed, result.counts.skipped, result.requeued) == (VARIANTS, 0, 0, 2)
    assert sum(n for event, n in rendered if event == "rendered") == VARIANTS
    assert {u for e, _, p, u in events if e == "died" and p == killed["pid"]} == killed["units"]
    assert {u for e, _, p, u in events if e == "requeued" and p == killed["pid"]} == killed["units"]
    finished = [(u, p) for e, _, p, u in events if e == "finished"]
    assert sorted(u for u, _ in finished) == list(range(len(units)))  # each unit finished once
    assert all(p != killed["pid"] for u, p in finished if u in killed["units"])
    assert sum(result.units_per_worker.values()) == len(units)
    pool_tests._rendered_once(settings, VARIANTS)

    reference, ref_planned, _ = pool_tests._planned(tmp_path, campaign_model, "reference")
    pool_tests._render_here(reference, ref_planned)
    assert pool_tests._files(settings) == pool_tests._files(reference)


def _poisoned(poison: int, delay: float) -> None:
    """A render worker's ``worker_init``: the worker dies (exit code 3) when it claims variant ``poison``, and each
    delivery takes ``delay`` seconds longer before it records."""
    import flows.delivery as delivery
    import flows.rendering as rendering

    real_claim, real_record = rendering.claim_variants, delivery.record_assets

    def claim(db, run_id, ids):
        if poison in ids:
            os._exit(3)
        return real_claim(db, run_id, ids)

    def record(*args, **kwargs):
        time.sleep(delay)
        return real_record(*args, **kwargs)

    rendering.claim_variants, delivery.record_assets = claim, record


def test_a_unit_lost_beside_a_crashing_one_is_not_failed_for_it(tmp_path: Path, campaign_model: Path,
                                                                 fresh_resources) -> None:
    """Unit 1 kills every worker that takes it; the first time, unit 0 is delivering on that worker. Both are
    re-queued and rendered alone from then on: unit 0 is rendered, unit 1 is given up after it took down a worker on
    its own (``unit_attempts=1``), the other units are rendered."""
    settings, planned, units = pool_tests._planned(tmp_path, campaign_model, "poison", steps=1)
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, settings.batch_size,
                        worker_init=functools.partial(_poisoned, units[1][0], 1.0))
    events: list[Event] = []
    with DevicePool(plan_workers("cpu", threads=1), config, restarts=3, unit_attempts=1,
                    observer=lambda *e: events.append(e)) as pool:
        result = pool.run(planned.run_id, units)
    died = [u for e, _, _, u in events if e == "died"]
    assert died == [0, 1, 1], events  # units 0 and 1 together, then unit 1 alone
    assert (result.counts.rendered, result.counts.failed, result.requeued) == (VARIANTS - len(units[1]), len(units[1]), 2)
    db = open_database(settings.db_url)
    with db.session() as s:
        status = dict(s.execute(select(Variant.id, Variant.status)).all())
    db.dispose()
    assert {status[i] for i in units[1]} == {"failed"}
    assert {status[i] for unit in units[:1] + units[2:] for i in unit} == {"done"}


# ------------------------------------------------------------------------------------------------ threads


def test_cpu_workers_share_the_free_cores_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.devices

    for name in ("ADFORGE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine.devices, "free_cpu_threads", lambda *a, **k: 6)
    assert [s.threads for s in plan_workers("cpu,cpu", cuda_count=0)] == [3, 3]
    monkeypatch.setenv("ADFORGE_THREADS", "4")
    assert [s.threads for s in plan_workers("cpu,cpu", cuda_count=0)] == [2, 2]
    monkeypatch.delenv("ADFORGE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch's own count (tests/conftest.py: 1)
    assert [s.threads for s in plan_workers("cpu,cpu", cuda_count=0)] == [torch.get_num_threads()] * 2


def _tell_threads() -> None:
    """A render worker's ``worker_init``: once a unit has loaded its pipeline, log the worker's torch threads."""
    import flows.rendering as rendering

    real = rendering.get_pipeline

    def get_pipeline(*args, **kwargs):
        pipe = real(*args, **kwargs)
        logging.getLogger("tests.threads").warning("torch threads %d, ADFORGE_THREADS=%s", torch.get_num_threads(),
                                                   os.environ.get("ADFORGE_THREADS"))
        return pipe

    rendering.get_pipeline = get_pipeline


def test_a_worker_keeps_its_threads_past_pipeline_load(tmp_path: Path, campaign_model: Path, fresh_resources,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Pipeline.load gives torch the free cores unless ADFORGE_THREADS says: a worker's own share (here 3, more than
    this machine's free cores) is in its environment, so the load keeps it."""
    for name in ("ADFORGE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    settings: Settings
    settings, planned, units = pool_tests._planned(tmp_path, campaign_model, "threads", steps=1)
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, settings.batch_size,
                        worker_init=_tell_threads)
    with caplog.at_level(logging.WARNING), DevicePool([WorkerSpec("cpu", "cpu", "", 3)], config) as pool:
        result = pool.run(planned.run_id, units[:1])
    assert result.counts.rendered == len(units[0])
    told = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert told == ["[render worker cpu] torch threads 3, ADFORGE_THREADS=3"]

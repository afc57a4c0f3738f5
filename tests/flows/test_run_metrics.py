"""Run and campaign figures (storage/run_metrics.py) after real campaign runs on the tiny model: each figure equals what
this test counts from the database's rows itself, on SQLite and PostgreSQL; a failed variant raises the failure rate;
a price gives a cost per image; percentiles of known values; what a run records for its images (queue wait) and its
device (device-seconds; no memory or utilisation on the CPU)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from flows.campaign import campaign_run
from flows.counts import DeviceUse, RenderCounts
from flows.settings import SettingsError, load_settings
from storage.database import open_database
from storage.run_metrics import MAX_ROWS, campaign_metrics, percentile, run_metrics, spread
from storage.schema import Asset, AuditEntry, BriefRowRecord, Campaign, Run, Variant
from tests.helpers import templates_with_channels, write_brief

CHANNELS = ("  m_png:\n    width: 64\n    height: 64\n    format: png\n    max_kb: 8192\n"
            "  m_impossible:\n    width: 256\n    height: 256\n    format: png\n    max_kb: 1\n")
HEADER = ["campaign", "row_id", "subject", "channels", "variants"]
PRICE = 2.5


def _run(tmp_path: Path, db_url: str, model: Path, rows: list[dict], **extra) -> dict:
    brief = write_brief(tmp_path / "brief.csv", rows, HEADER)
    overrides = {"db_url": db_url, "store_url": str(tmp_path / "assets"), "model": str(model), "steps": 2,
                 "batch_size": 2, "templates_dir": str(templates_with_channels(tmp_path, CHANNELS)), **extra}
    return campaign_run(str(brief), overrides=overrides)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


@pytest.mark.usefixtures("campaign_caches")
def test_figures_equal_the_rows_and_a_failed_variant_raises_the_failure_rate(tmp_path: Path, campaign_model: Path,
                                                                            db_url: str) -> None:
    summary = _run(tmp_path, db_url, campaign_model, [
        {"campaign": "metrics-a", "row_id": "a1", "subject": "a red circle", "channels": "m_png", "variants": "3"},
        {"campaign": "metrics-b", "row_id": "b1", "subject": "a blue square", "channels": "m_png, m_impossible",
         "variants": "2"},
    ], price_per_device_hour=PRICE)
    run_id = summary["run_id"]
    assert summary["counts"]["rendered"] == 5 and summary["counts"]["failed"] == 2

    db = open_database(db_url)
    with db.session() as s:
        run = s.get(Run, run_id)
        rows = s.execute(select(Asset, Campaign.name).join(Variant, Asset.variant_id == Variant.id)
                         .join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                         .join(Campaign, Campaign.id == BriefRowRecord.campaign_id)).all()
        failed = s.execute(select(Variant, Campaign.name).join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                           .join(Campaign, Campaign.id == BriefRowRecord.campaign_id)
                           .where(Variant.status == "failed")).all()
        failure_entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "variant.failed",
                                                             AuditEntry.run_id == run_id)).all()
        [figures] = run_metrics(s, run_ids=[run_id])
        by_campaign = {c.name: c for c in campaign_metrics(s)}
    db.dispose()

    # What the run recorded: each image's queue wait, the device's seconds (the CPU: no memory, no utilisation).
    assert len(rows) == 5 and all(a.run_id == run_id for a, _ in rows)
    assert all(a.queue_seconds is not None and a.queue_seconds >= 0 for a, _ in rows)
    assert all(a.render_seconds is not None and a.render_seconds > 0 for a, _ in rows)
    devices = run.timings["devices"]
    assert set(devices) == {"cpu"} and devices["cpu"]["seconds"] > 0
    assert "peak_memory_bytes" not in devices["cpu"] and "gpu_utilisation" not in devices["cpu"]

    # The run's figures, against the rows counted here.
    f = figures.figures
    assert figures.campaigns == ("metrics-a", "metrics-b") and figures.status == "completed_with_failures"
    assert f.delivered == len(rows) == 5
    assert f.failed == len(failed) == len({e.entity_id for e in failure_entries}) == 2
    assert f.failure_rate == pytest.approx(2 / 7)
    assert f.flagged == sum(1 for a, _ in rows if a.flagged)
    wall = (_aware(run.finished_at) - _aware(run.started_at)).total_seconds()
    assert f.wall_seconds == pytest.approx(wall)
    assert f.images_per_minute == pytest.approx(5 / wall * 60)
    latency = np.percentile([a.render_seconds for a, _ in rows], [50, 90, 99])
    assert (f.latency.p50, f.latency.p90, f.latency.p99) == pytest.approx(tuple(latency))
    queue = np.percentile([a.queue_seconds for a, _ in rows], [50, 90])
    assert (f.queue.p50, f.queue.p90) == pytest.approx(tuple(queue))
    assert f.device_seconds == pytest.approx(devices["cpu"]["seconds"])
    assert figures.price == PRICE  # the price the run was started with
    assert f.cost_per_image == pytest.approx(devices["cpu"]["seconds"] / 3600 * PRICE / 5)

    # Per campaign: its own images and failures; the run's time and cost shared by images (3 of 7, 4 of 7).
    a, b = by_campaign["metrics-a"].figures, by_campaign["metrics-b"].figures
    assert (a.delivered, a.failed, b.delivered, b.failed) == (3, 0, 2, 2)
    assert a.failure_rate == 0 and b.failure_rate == pytest.approx(0.5)
    assert b.failure_rate > a.failure_rate
    assert a.cost + b.cost == pytest.approx(f.cost)
    assert a.device_seconds == pytest.approx(f.device_seconds * 3 / 7)
    assert a.cost_per_image == pytest.approx(f.cost * 3 / 7 / 3)
    b_latency = np.percentile([x.render_seconds for x, name in rows if name == "metrics-b"], [50, 90, 99])
    assert (b.latency.p50, b.latency.p90, b.latency.p99) == pytest.approx(tuple(b_latency))


def test_percentiles_of_known_values() -> None:
    values = [float(v) for v in range(1, 13)]  # 1 .. 12
    assert percentile(values, 50) == pytest.approx(6.5)
    assert percentile(values, 90) == pytest.approx(10.9)
    assert percentile(values, 99) == pytest.approx(11.89)
    assert percentile([4.0], 99) == 4.0 and percentile([], 50) is None
    s = spread([3.0, None, 1.0, 2.0])  # unordered, a missing value ignored
    assert (s.p50, s.n) == (2.0, 3)
    assert (spread(values).p90, spread(values).p99) == tuple(np.percentile(values, [90, 99]))
    assert MAX_ROWS == 100_000


def test_cost_needs_a_price_and_uses_the_runs_own_first(db_url: str, tmp_path: Path) -> None:
    """Rows as a run leaves them (tests/review/world.py), with known engine seconds and device-seconds."""
    from storage.assets import open_store
    from tests.review.world import build_world

    db = open_database(db_url)
    world = build_world(db, open_store(str(tmp_path / "assets")), str(tmp_path / "assets"), per_channel=3)
    with db.session() as s:
        assets = s.scalars(select(Asset).order_by(Asset.id)).all()
        for i, a in enumerate(assets, start=1):
            a.render_seconds = float(i)
        run = s.scalars(select(Run)).one()
        run.timings = {"engine": 1.0, "devices": {"cuda": {"seconds": 7200.0, "peak_memory_bytes": 3 << 30}}}
        run_id = run.id
    with db.session() as s:
        [none] = run_metrics(s, run_ids=[run_id])
        [priced] = run_metrics(s, run_ids=[run_id], price=4.0)
        [camp] = campaign_metrics(s, price=4.0)
    assert none.figures.cost is None and none.figures.cost_per_image is None and none.price is None
    assert priced.figures.device_hours == 2.0 and priced.figures.cost == 8.0
    assert priced.figures.cost_per_image == pytest.approx(8.0 / 12)
    assert (priced.figures.latency.p50, priced.figures.latency.p90) == pytest.approx((6.5, 10.9))
    assert priced.devices["cuda"]["peak_memory_bytes"] == 3 << 30
    assert camp.campaign_id == world.campaign_id and camp.figures.cost == 8.0
    with db.session() as s:
        s.get(Run, run_id).settings = {"price_per_device_hour": 1.5}  # the run's own price wins over the configured one
    with db.session() as s:
        [own] = run_metrics(s, run_ids=[run_id], price=4.0)
    assert own.price == 1.5 and own.figures.cost == 3.0
    db.dispose()


def test_device_use_adds_up_and_stays_absent_off_cuda() -> None:
    a = RenderCounts(devices={"cuda": DeviceUse(10.0, 100, 150.0, 2)})
    b = RenderCounts(devices={"cuda": DeviceUse(5.0, 300, 50.0, 2), "cpu": DeviceUse(3.0)})
    total = a + b
    assert total.devices["cuda"].seconds == 15.0 and total.devices["cuda"].peak_memory == 300
    assert total.devices["cuda"].utilisation == 50.0  # (150 + 50) / 4 samples
    assert total.devices["cpu"].record() == {"seconds": 3.0}
    assert a.devices["cuda"].seconds == 10.0  # __add__ leaves its operands alone


def test_price_and_metrics_port_are_checked_when_loaded(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^ADFORGE_PRICE_PER_DEVICE_HOUR: 'price_per_device_hour' must be a number >= 0"):
        load_settings(env={"ADFORGE_PRICE_PER_DEVICE_HOUR": "-1"}, cwd=tmp_path)
    with pytest.raises(SettingsError, match=r"'price_per_device_hour' must be a number >= 0"):
        load_settings({"price_per_device_hour": "nan"}, env={}, cwd=tmp_path)
    with pytest.raises(SettingsError, match=r"^command line: 'metrics_port' must be in 0 \.\. 65535"):
        load_settings({"metrics_port": 70000}, env={}, cwd=tmp_path)
    s = load_settings(env={"ADFORGE_PRICE_PER_DEVICE_HOUR": "2.75", "ADFORGE_METRICS_PORT": "9400"}, cwd=tmp_path)
    assert (s.price_per_device_hour, s.metrics_port) == (2.75, 9400)

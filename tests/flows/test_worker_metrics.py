"""Render workers' Prometheus endpoints (flows/worker_metrics.py), scraped over HTTP: a run rendered in the flow
process serves them on ``metrics_port``; each worker of a device pool on ``metrics_port`` + its index. The counts
they serve equal the assets and failures the database recorded."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from flows.campaign import campaign_run, plan_run, validate_brief
from flows.device_pool import DevicePool, PoolConfig, plan_workers
from flows.settings import load_settings
from flows.worker_metrics import REGISTRY, stop_render_metrics
from storage.database import open_database, sqlite_url
from storage.schema import Asset, Run
from tests.helpers import templates_with_channels, write_brief

CHANNELS = ("  w_png:\n    width: 64\n    height: 64\n    format: png\n    max_kb: 8192\n"
            "  w_impossible:\n    width: 256\n    height: 256\n    format: png\n    max_kb: 1\n")


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free consecutive ports")


def _scrape(port: int) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: {s.name + str(sorted(s.labels.items())): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def _value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.mark.usefixtures("campaign_caches")
def test_a_run_in_the_flow_process_serves_its_counts(tmp_path: Path, campaign_model: Path) -> None:
    port = _free_ports(1)
    before = {n: _value(n) for n in ("adforge_worker_images_rendered_total", "adforge_worker_images_failed_total",
                                     "adforge_worker_engine_seconds_count", "adforge_worker_queue_seconds_count")}
    brief = write_brief(tmp_path / "brief.csv", ['w,r1,a red circle,"w_png, w_impossible",2'],
                        ["campaign", "row_id", "subject", "channels", "variants"])
    db_url = sqlite_url(tmp_path / "a.db")
    try:
        summary = campaign_run(str(brief), overrides={
            "db_url": db_url, "store_url": str(tmp_path / "assets"), "model": str(campaign_model), "steps": 2,
            "batch_size": 2, "devices": "cpu", "metrics_port": port,
            "templates_dir": str(templates_with_channels(tmp_path, CHANNELS))})
        scraped = _scrape(port)
    finally:
        stop_render_metrics()
    db = open_database(db_url)
    with db.session() as s:
        assets = s.scalar(select(func.count(Asset.id)).where(Asset.run_id == summary["run_id"]))
        failed = s.get(Run, summary["run_id"]).counts["failed"]
    db.dispose()
    assert (assets, failed) == (2, 2)
    rendered = scraped["adforge_worker_images_rendered"]["adforge_worker_images_rendered_total[]"]
    assert rendered - before["adforge_worker_images_rendered_total"] == assets
    failures = scraped["adforge_worker_images_failed"]["adforge_worker_images_failed_total[]"]
    assert failures - before["adforge_worker_images_failed_total"] == failed
    engine = scraped["adforge_worker_engine_seconds"]["adforge_worker_engine_seconds_count[]"]
    assert engine - before["adforge_worker_engine_seconds_count"] == assets
    queue = scraped["adforge_worker_queue_seconds"]["adforge_worker_queue_seconds_count[]"]
    assert queue - before["adforge_worker_queue_seconds_count"] == assets
    info = scraped["adforge_worker_info"]
    assert info["adforge_worker_info[('device', 'cpu'), ('worker', 'cpu')]"] == 1
    assert "adforge_worker_device_memory_bytes" not in scraped  # no CUDA: no device gauges


def test_each_pool_worker_serves_on_its_own_port(tmp_path: Path, campaign_model: Path) -> None:
    from flows.campaign import close_resources
    from flows.rendering import clear_pipelines

    brief = tmp_path / "pool.csv"
    brief.write_text("campaign,row_id,subject,channels,variants\n"
                     "pool,r1,a red circle,instagram_square,3\npool,r2,a blue circle,instagram_square,3\n")
    settings = load_settings({"db_url": sqlite_url(tmp_path / "a.db"), "store_url": str(tmp_path / "assets"),
                              "model": str(campaign_model), "steps": 2, "batch_size": 2})
    try:
        planned = plan_run.fn(validate_brief.fn(str(brief), False, None), settings, False, None)
    finally:
        close_resources()
        clear_pipelines()
    units = [b[i : i + 2] for b in planned.batches for i in range(0, len(b), 2)]
    port = _free_ports(2)
    config = PoolConfig(settings.db_url, settings.store_url, settings.dtype, 2, metrics_port=port)
    with DevicePool(plan_workers("cpu,cpu", threads=2), config) as pool:
        result = pool.run(planned.run_id, units)
        scraped = [_scrape(port), _scrape(port + 1)]  # while the workers live
    assert result.counts.rendered == 6
    workers = {k for s in scraped for k in s["adforge_worker_info"]}
    assert workers == {"adforge_worker_info[('device', 'cpu'), ('worker', 'cpu#1')]",
                       "adforge_worker_info[('device', 'cpu'), ('worker', 'cpu#2')]"}
    rendered = [s["adforge_worker_images_rendered"]["adforge_worker_images_rendered_total[]"] for s in scraped]
    assert sum(rendered) == 6 and rendered == [result.units_per_worker.get(w, 0) * 2 for w in ("cpu#1", "cpu#2")]
    # The pool's counts carry each worker's device use, summed.
    assert set(result.counts.devices) == {"cpu"} and result.counts.devices["cpu"].seconds > 0
    db = open_database(settings.db_url)
    with db.session() as s:
        queued = s.scalars(select(Asset.queue_seconds)).all()
    db.dispose()
    assert len(queued) == 6 and all(q is not None and q >= 0 for q in queued)

"""What a rendering process measures per batch, and its Prometheus endpoint.

Every delivered batch (:func:`flows.delivery.deliver_batch`, whichever process renders: the flow process itself, a
device worker, a shard's) gets its images' queue wait for their asset rows (:func:`with_queue_wait`: the run's start
to the moment the batch entered the engine, in wall time, since a run spans processes and machines), and once
recorded goes through :func:`observe_batch`: the device it used, for the run's counts (:mod:`flows.device_use`), and
this process's Prometheus metrics.

With ``metrics_port`` > 0, :func:`serve_render_metrics` serves those metrics at ``/metrics`` on that port (a device
worker: ``metrics_port`` + its index in the pool): images rendered and failed, engine seconds per image and queue
wait (histograms), and on CUDA the device's memory and utilisation (gauges). They count what this process did since
it started; the database holds the totals (the gallery's ``/metrics``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from flows.device_use import last_utilisation, start_sampling, take_device_use
from storage.run_metrics import ENGINE_BUCKETS, QUEUE_BUCKETS

if TYPE_CHECKING:
    from flows.counts import RenderCounts
    from flows.delivery import RenderedBatch
    from flows.recording import AssetRecord
    from storage.database import Database

__all__ = ["ENGINE_BUCKETS", "QUEUE_BUCKETS", "REGISTRY", "count_failed", "observe_batch", "queue_seconds",
           "run_started", "serve_render_metrics", "stop_render_metrics", "with_queue_wait"]

log = logging.getLogger(__name__)

# This process's own registry (not prometheus_client's global one): what it serves is only what it rendered.
REGISTRY = CollectorRegistry(auto_describe=True)
RENDERED = Counter("adforge_worker_images_rendered", "Images this process rendered and delivered.", registry=REGISTRY)
FAILED = Counter("adforge_worker_images_failed", "Variants that failed in this process.", registry=REGISTRY)
ENGINE = Histogram("adforge_worker_engine_seconds", "Engine seconds per image (its batch's engine time / images).",
                   buckets=ENGINE_BUCKETS, registry=REGISTRY)
QUEUE = Histogram("adforge_worker_queue_seconds", "Seconds from the run's start until the image's batch entered the engine.",
                  buckets=QUEUE_BUCKETS, registry=REGISTRY)


def count_failed(n: int) -> None:
    FAILED.inc(n)


# ------------------------------------------------------------------------------------------------ queue wait

_LOCK = threading.Lock()
_STARTED: dict[tuple[str, int], float | None] = {}


def run_started(db: Database, run_id: int) -> float | None:
    """The run's start (``runs.started_at``) as a POSIX timestamp, read once per process and run."""
    from storage.schema import Run

    key = (str(db.url), run_id)
    with _LOCK:
        if key not in _STARTED:
            with db.session() as s:
                run = s.get(Run, run_id)
                started = run.started_at if run is not None else None
            if started is not None and started.tzinfo is None:  # SQLite keeps no zone; it was written in UTC
                started = started.replace(tzinfo=dt.timezone.utc)
            _STARTED[key] = started.timestamp() if started is not None else None
        return _STARTED[key]


def queue_seconds(db: Database, run_id: int, entered: float) -> float | None:
    """Seconds from the run's start to ``entered`` (a batch entering the engine, POSIX time); a clock behind the
    database's (another machine's) gives 0, not a negative wait."""
    started = run_started(db, run_id)
    return None if started is None else round(max(0.0, entered - started), 4)


# ------------------------------------------------------------------------------------------------ per batch


def with_queue_wait(db: Database, run_id: int, batch: RenderedBatch, records: Sequence[AssetRecord]) -> list[AssetRecord]:
    """``records`` (a batch's images) with the batch's queue wait, for their asset rows."""
    queued = queue_seconds(db, run_id, batch.started)
    return [replace(r, queue_seconds=queued) for r in records]


def observe_batch(run_id: int, batch: RenderedBatch, records: Sequence[AssetRecord], counts: RenderCounts) -> None:
    """A recorded batch measured: the device's use added to ``counts``, this process's metrics observed."""
    take_device_use(counts, run_id, batch.device, batch.started)
    RENDERED.inc(len(records))
    for r in records:
        if r.render_seconds is not None:
            ENGINE.observe(r.render_seconds)
        if r.queue_seconds is not None:
            QUEUE.observe(r.queue_seconds)


# ------------------------------------------------------------------------------------------------ the endpoint

_SERVERS: dict[int, object] = {}


def serve_render_metrics(port: int, name: str, device: str) -> int | None:
    """Serve this process's metrics on ``port`` (once per process and port; 0: not at all) and sample ``device``'s
    utilisation. Returns the port served, None when none is (a port in use is logged, not raised: the run goes on)."""
    start_sampling(device)
    if port <= 0:
        return None
    with _LOCK:
        if port in _SERVERS:
            return port
        _device_gauges(name, device)
        try:
            _SERVERS[port] = start_http_server(port, registry=REGISTRY)
        except OSError as exc:
            log.warning("render metrics of %s: cannot serve on port %d: %s", name, port, exc.strerror or exc)
            return None
    log.info("render metrics of %s on http://0.0.0.0:%d/metrics", name, port)
    return port


def stop_render_metrics() -> None:
    """Stop every endpoint this process serves (tests)."""
    with _LOCK:
        for server, thread in _SERVERS.values():  # type: ignore[misc]
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        _SERVERS.clear()


_GAUGES: dict[str, Gauge] = {}


def _device_gauges(name: str, device: str) -> None:
    """On CUDA: memory allocated now, its peak, and the latest utilisation sample, read at each scrape."""
    import torch

    info = _GAUGES.get("info") or Gauge("adforge_worker_info", "The worker and the device it renders on.",
                                        ["worker", "device"], registry=REGISTRY)
    _GAUGES["info"] = info
    info.labels(worker=name, device=device).set(1)
    dev = torch.device(device)
    if dev.type != "cuda" or "memory" in _GAUGES or not torch.cuda.is_available():
        return
    if dev.index is None:
        dev = torch.device("cuda", 0)
    _GAUGES["memory"] = Gauge("adforge_worker_device_memory_bytes", "Device memory torch holds allocated now.",
                              registry=REGISTRY)
    _GAUGES["memory"].set_function(lambda: torch.cuda.memory_allocated(dev))
    _GAUGES["reserved"] = Gauge("adforge_worker_device_reserved_bytes", "Device memory torch's allocator reserved.",
                                registry=REGISTRY)
    _GAUGES["reserved"].set_function(lambda: torch.cuda.memory_reserved(dev))
    _GAUGES["utilisation"] = Gauge("adforge_worker_gpu_utilisation_percent",
                                   "The latest GPU utilisation sample (NVML); NaN where NVML is not importable.",
                                   registry=REGISTRY)
    _GAUGES["utilisation"].set_function(lambda: _or_nan(last_utilisation(dev)))


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value

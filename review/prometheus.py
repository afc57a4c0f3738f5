"""The gallery's ``GET /metrics``: the database's figures in the Prometheus text format, read at each scrape.

A custom collector (no counters kept in the web process): every sample is a query over the database at scrape time,
so the numbers are the database's exactly, whichever process rendered, and several gallery processes agree.

=================================================  =========  ====================================================
``adforge_assets{campaign,status}``                gauge      stored assets by review status (pending, approved,
                                                              rejected): they move between statuses, so a gauge
``adforge_assets_flagged_total{campaign}``         counter    assets the image filter flagged
``adforge_variants{campaign,status}``              gauge      variants by status (planned, done, failed): they move
                                                              between statuses, so a gauge
``adforge_runs{status}``                           gauge      runs by status (running, completed, ...)
``adforge_variant_failures_total{campaign}``       counter    variants a run failed (one per variant and run)
``adforge_engine_seconds{campaign}``               histogram  engine seconds per image (``assets.render_seconds``)
``adforge_queue_seconds{campaign}``                histogram  the run's start to the image's batch entering the
                                                              engine (``assets.queue_seconds``)
``adforge_device_seconds_total{campaign}``         counter    device-seconds of the campaign's runs (shared by
                                                              their images when a run renders several campaigns)
``adforge_cost_total{campaign}``                   counter    device-hours x price per device-hour, where priced
``adforge_cost_per_image{campaign}``               gauge      that cost / the campaign's delivered images
=================================================  =========  ====================================================
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import InstrumentedAttribute

from storage.database import Database
from storage.review_schema import ReviewState
from storage.run_metrics import ENGINE_BUCKETS, QUEUE_BUCKETS, campaign_metrics
from storage.schema import Asset, Campaign, Run, Variant
from storage.variants import with_joins

__all__ = ["DatabaseCollector"]


class DatabaseCollector(Collector):
    def __init__(self, db: Database, price_per_device_hour: float = 0.0):
        self.db = db
        self.price = price_per_device_hour

    def collect(self) -> Iterator[Metric]:
        with self.db.session() as s:
            assets = GaugeMetricFamily("adforge_assets", "Stored assets by campaign and review status.",
                                         labels=["campaign", "status"])
            review = func.coalesce(ReviewState.status, "pending")
            query = with_joins(select(Campaign.name, review, func.count(Asset.id)), asset=True, campaign=True, review=True)
            for name, status, n in s.execute(query.group_by(Campaign.name, review)):
                assets.add_metric([name, status], n)
            yield assets

            flagged = CounterMetricFamily("adforge_assets_flagged", "Assets the image filter flagged, by campaign.",
                                          labels=["campaign"])
            query = with_joins(select(Campaign.name, func.count(Asset.id)), asset=True, campaign=True)
            for name, n in s.execute(query.where(Asset.flagged.is_(True)).group_by(Campaign.name)):
                flagged.add_metric([name], n)
            yield flagged

            variants = GaugeMetricFamily("adforge_variants", "Variants by campaign and status (planned, done, failed).",
                                         labels=["campaign", "status"])
            query = with_joins(select(Campaign.name, Variant.status, func.count(Variant.id)), campaign=True)
            for name, status, n in s.execute(query.group_by(Campaign.name, Variant.status)):
                variants.add_metric([name, status], n)
            yield variants

            runs = GaugeMetricFamily("adforge_runs", "Runs by status.", labels=["status"])
            for status, n in s.execute(select(Run.status, func.count(Run.id)).group_by(Run.status)):
                runs.add_metric([status], n)
            yield runs

            yield _histogram(s, "adforge_engine_seconds", "Engine seconds per image, by campaign.",
                             Asset.render_seconds, ENGINE_BUCKETS)
            yield _histogram(s, "adforge_queue_seconds",
                             "Seconds from the run's start until the image's batch entered the engine, by campaign.",
                             Asset.queue_seconds, QUEUE_BUCKETS)

            failures = CounterMetricFamily("adforge_variant_failures", "Variants a run failed (one per variant and "
                                           "run), by campaign.", labels=["campaign"])
            device = CounterMetricFamily("adforge_device_seconds", "Device-seconds of the campaign's runs.",
                                         labels=["campaign"])
            cost = CounterMetricFamily("adforge_cost", "Device-hours x the price per device-hour, by campaign.",
                                       labels=["campaign"])
            per_image = GaugeMetricFamily("adforge_cost_per_image", "Cost per delivered image, by campaign.",
                                          labels=["campaign"])
            for c in campaign_metrics(s, price=self.price):
                f = c.figures
                failures.add_metric([c.name], f.failed)
                if f.device_seconds is not None:
                    device.add_metric([c.name], f.device_seconds)
                if f.cost is not None:
                    cost.add_metric([c.name], f.cost)
                if f.cost_per_image is not None:
                    per_image.add_metric([c.name], f.cost_per_image)
            yield from (failures, device, cost, per_image)


def _histogram(s, name: str, doc: str, column: InstrumentedAttribute, bounds: Sequence[float]) -> HistogramMetricFamily:
    """Cumulative bucket counts per campaign, counted by the database (every row, no sampling)."""
    family = HistogramMetricFamily(name, doc, labels=["campaign"])
    below = [func.sum(case((column <= b, 1), else_=0)) for b in bounds]
    query = with_joins(select(Campaign.name, func.count(column), func.sum(column), *below), asset=True, campaign=True)
    for name_, n, total, *counts in s.execute(query.where(column.is_not(None)).group_by(Campaign.name)):
        buckets = [(_le(b), int(c or 0)) for b, c in zip(bounds, counts)] + [("+Inf", n)]
        family.add_metric([name_], buckets, float(total or 0.0))
    return family


def _le(bound: float) -> str:
    return repr(float(bound))

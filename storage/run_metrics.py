"""Run and campaign figures from the metadata database: what ``adforge runs --stats``, the gallery's metrics page and
its Prometheus ``/metrics`` show. Plain SQLAlchemy over ``runs``, ``variants``, ``assets`` and the audit log, so
the figures are the database's on SQLite and PostgreSQL alike.

Per run and per campaign:

* delivered: assets written (``assets.run_id``); flagged: those the image filter flagged (``assets.flagged``);
* failed: variants a run failed (its ``variant.failed`` audit entries, one per variant and run), so a variant that
  failed and was rendered by a later run still counts against the run that failed it; failure rate =
  failed / (delivered + failed);
* images per minute: delivered / the run's wall time (``started_at`` to ``finished_at``, or to now while it runs);
* engine latency per image (``assets.render_seconds``: its batch's engine time / the batch's images) and queue wait
  (``assets.queue_seconds``: the run's start to its batch entering the engine) as p50 / p90 / p99, computed here
  over at most :data:`MAX_ROWS` of the newest assets in scope (linear interpolation between ranks, numpy's
  default);
* device-hours: the device-seconds the run recorded (``runs.timings["devices"]``, summed over devices), or for a
  run recorded without them its engine seconds (``runs.timings["engine"]``);
* cost: device-hours x the price per device-hour the run was started with (``runs.settings``), or, for a run that
  recorded none, the price given here (the configured one); cost per image = cost / delivered.

A run that renders for several campaigns shares its wall time, device-hours and cost among them by their share of
its images (delivered + failed), so campaign totals add up to the runs' totals.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import String, case, cast, distinct, func, select
from sqlalchemy.orm import Session

from storage.schema import Asset, AuditEntry, BriefRowRecord, Campaign, Run, Variant
from storage.variants import with_joins

__all__ = ["ENGINE_BUCKETS", "MAX_ROWS", "QUEUE_BUCKETS", "CampaignMetrics", "Figures", "RunMetrics", "Spread", "campaign_metrics", "device_seconds",
           "percentile", "run_metrics", "spread"]

MAX_ROWS = 100_000  # newest assets read per run or campaign for the percentiles
# Histogram buckets (seconds) shared by the gallery's /metrics and the render workers' (flows.worker_metrics).
# Engine seconds per image: a tiny model on a CPU (milliseconds) to SDXL with a hires fix (tens of seconds).
ENGINE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Queue wait: a run's first batch waits for planning and model loading, its last for every batch before it.
QUEUE_BUCKETS = (0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0)
FAILED_ACTION = "variant.failed"  # flows.recording.record_failure's audit action


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) of ascending ``ordered``, interpolating linearly between ranks; None if empty."""
    if not ordered:
        return None
    k = (len(ordered) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass(frozen=True)
class Spread:
    """Percentiles of a per-image figure (seconds), None without data; ``n`` values behind them."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    n: int = 0


def spread(values: Iterable[float | None]) -> Spread:
    ordered = sorted(v for v in values if v is not None)
    return Spread(percentile(ordered, 50), percentile(ordered, 90), percentile(ordered, 99), len(ordered))


@dataclass(frozen=True)
class Figures:
    delivered: int = 0
    failed: int = 0
    flagged: int = 0
    wall_seconds: float | None = None
    device_seconds: float | None = None
    cost: float | None = None  # None: no price, or no device time recorded
    latency: Spread = field(default_factory=Spread)  # engine seconds per image
    queue: Spread = field(default_factory=Spread)  # queue wait per image

    @property
    def failure_rate(self) -> float | None:
        attempts = self.delivered + self.failed
        return self.failed / attempts if attempts else None

    @property
    def images_per_minute(self) -> float | None:
        return 60 * self.delivered / self.wall_seconds if self.wall_seconds else None

    @property
    def device_hours(self) -> float | None:
        return None if self.device_seconds is None else self.device_seconds / 3600

    @property
    def cost_per_image(self) -> float | None:
        return self.cost / self.delivered if self.cost is not None and self.delivered else None


@dataclass(frozen=True)
class RunMetrics:
    run_id: int
    status: str
    started_at: dt.datetime
    campaigns: tuple[str, ...]
    figures: Figures
    price: float | None  # per device-hour, as used for the cost
    devices: dict[str, dict] = field(default_factory=dict)  # runs.timings["devices"]: kind -> seconds, memory, use


@dataclass(frozen=True)
class CampaignMetrics:
    campaign_id: int
    name: str
    figures: Figures
    run_ids: tuple[int, ...]


# ------------------------------------------------------------------------------------------------ per run


def device_seconds(timings: dict | None) -> float | None:
    """A run's device-seconds: recorded per device kind, else (older runs, fanned-out ones) its engine seconds."""
    timings = timings or {}
    devices = timings.get("devices")
    if isinstance(devices, dict) and devices:
        return sum(float(d.get("seconds", 0.0)) for d in devices.values() if isinstance(d, dict))
    engine = timings.get("engine")
    return float(engine) if isinstance(engine, (int, float)) else None


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)  # SQLite keeps no zone: UTC written


def _wall(run: Run, now: dt.datetime) -> float | None:
    if run.started_at is None:
        return None
    end = _aware(run.finished_at) if run.finished_at is not None else now
    return max(0.0, (end - _aware(run.started_at)).total_seconds())


def _price(run: Run, fallback: float) -> float | None:
    recorded = (run.settings or {}).get("price_per_device_hour")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and recorded > 0:
        return float(recorded)
    return fallback if fallback > 0 else None


def _cost(device_secs: float | None, price: float | None) -> float | None:
    return None if device_secs is None or price is None else device_secs / 3600 * price


def _by_run_and_campaign(s: Session, run_ids: Sequence[int] | None) -> dict[tuple[int, int], list[int]]:
    """(run, campaign) -> [delivered, flagged, failed]."""
    out: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    flagged = func.sum(case((Asset.flagged.is_(True), 1), else_=0))
    assets = with_joins(select(Asset.run_id, BriefRowRecord.campaign_id, func.count(Asset.id), flagged), asset=True, row=True)
    assets = assets.where(Asset.run_id.is_not(None)).group_by(Asset.run_id, BriefRowRecord.campaign_id)
    failures = (select(AuditEntry.run_id, BriefRowRecord.campaign_id, func.count(distinct(AuditEntry.entity_id)))
                .select_from(AuditEntry)
                .join(Variant, AuditEntry.entity_id == cast(Variant.id, String))
                .join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                .where(AuditEntry.action == FAILED_ACTION, AuditEntry.run_id.is_not(None))
                .group_by(AuditEntry.run_id, BriefRowRecord.campaign_id))
    if run_ids is not None:
        assets = assets.where(Asset.run_id.in_(run_ids))
        failures = failures.where(AuditEntry.run_id.in_(run_ids))
    for run_id, campaign_id, n, flags in s.execute(assets):
        out[(run_id, campaign_id)][0:2] = [n, int(flags or 0)]
    for run_id, campaign_id, n in s.execute(failures):
        out[(run_id, campaign_id)][2] = n
    return out


def _per_image(s: Session, where) -> tuple[Spread, Spread]:
    query = with_joins(select(Asset.render_seconds, Asset.queue_seconds), asset=True, row=True)
    rows = s.execute(query.where(where).order_by(Asset.id.desc()).limit(MAX_ROWS)).all()
    return spread(r[0] for r in rows), spread(r[1] for r in rows)


def run_metrics(s: Session, *, run_ids: Sequence[int] | None = None, limit: int = 20, price: float = 0.0) -> list[RunMetrics]:
    """Figures of the runs ``run_ids`` (else the newest ``limit``), newest first; ``price`` per device-hour for runs
    that recorded none."""
    query = select(Run).order_by(Run.id.desc())
    runs = list(s.scalars(query.where(Run.id.in_(run_ids)) if run_ids is not None else query.limit(limit)))
    ids = [r.id for r in runs]
    per = _by_run_and_campaign(s, ids)
    names = dict(s.execute(select(Campaign.id, Campaign.name)).all())
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for run in runs:
        parts = {c: v for (r, c), v in per.items() if r == run.id}
        delivered, flagged, failed = (sum(v[i] for v in parts.values()) for i in range(3))
        latency, queue = _per_image(s, Asset.run_id == run.id)
        secs = device_seconds(run.timings)
        price_used = _price(run, price)
        figures = Figures(delivered, failed, flagged, _wall(run, now), secs, _cost(secs, price_used), latency, queue)
        devices = (run.timings or {}).get("devices")
        out.append(RunMetrics(run.id, run.status, run.started_at, tuple(sorted(names[c] for c in parts)), figures,
                              price_used, dict(devices) if isinstance(devices, dict) else {}))
    return out


# ------------------------------------------------------------------------------------------------ per campaign


def campaign_metrics(s: Session, *, price: float = 0.0, campaign_ids: Sequence[int] | None = None) -> list[CampaignMetrics]:
    """Figures of every campaign with rendered or failed variants (or of ``campaign_ids``), by name."""
    per = _by_run_and_campaign(s, None)
    runs = {r.id: r for r in s.scalars(select(Run).where(Run.id.in_({r for r, _ in per})))} if per else {}
    run_totals: dict[int, int] = defaultdict(int)
    for (r, _), v in per.items():
        run_totals[r] += v[0] + v[2]
    names = dict(s.execute(select(Campaign.id, Campaign.name)).all())
    wanted = set(campaign_ids) if campaign_ids is not None else {c for _, c in per}
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for campaign_id in sorted(wanted, key=lambda c: names.get(c, "")):
        parts = {r: v for (r, c), v in per.items() if c == campaign_id}
        wall = device = cost = 0.0
        has_device, priced = False, bool(parts)  # a cost only when every run with device time has a price
        for r, v in parts.items():
            run = runs[r]
            share = (v[0] + v[2]) / run_totals[r] if run_totals[r] else 0.0
            wall += (_wall(run, now) or 0.0) * share
            secs = device_seconds(run.timings)
            if secs is not None:
                has_device = True
                device += secs * share
                run_cost = _cost(secs, _price(run, price))
                priced = priced and run_cost is not None
                cost += (run_cost or 0.0) * share
        latency, queue = _per_image(s, BriefRowRecord.campaign_id == campaign_id)
        figures = Figures(sum(v[0] for v in parts.values()), sum(v[2] for v in parts.values()),
                          sum(v[1] for v in parts.values()), wall if parts else None, device if has_device else None,
                          cost if has_device and priced else None, latency, queue)
        out.append(CampaignMetrics(campaign_id, names.get(campaign_id, str(campaign_id)), figures, tuple(sorted(parts))))
    return out

"""``adforge runs --stats``: each recent run's figures as a Rich table, then each of their campaigns' totals
(:mod:`storage.run_metrics` computes them from the database)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from storage.database import Database
from storage.run_metrics import MAX_ROWS, Figures, campaign_metrics, run_metrics

__all__ = ["print_run_stats"]

COLUMNS = ("run", "status", "campaigns", "delivered", "failed", "fail %", "flagged", "img/min",
           "engine p50/p90/p99 s", "queue p50/p90 s", "device-h", "cost/img")


def _n(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _cells(f: Figures) -> list[str]:
    return [str(f.delivered), str(f.failed), _n(None if f.failure_rate is None else 100 * f.failure_rate, "{:.1f}"),
            str(f.flagged), _n(f.images_per_minute, "{:.1f}"),
            "/".join(_n(v, "{:.3f}") for v in (f.latency.p50, f.latency.p90, f.latency.p99)),
            "/".join(_n(v, "{:.1f}") for v in (f.queue.p50, f.queue.p90)),
            _n(f.device_hours, "{:.4f}"), _n(f.cost_per_image, "{:.5f}")]


def print_run_stats(out: Console, db: Database, *, limit: int, price: float) -> None:
    with db.session() as s:
        runs = run_metrics(s, limit=limit, price=price)
        shown = {c for r in runs for c in r.campaigns}
        campaigns = [c for c in campaign_metrics(s, price=price) if c.name in shown]
    table = Table(*COLUMNS, title="runs (newest first)", title_justify="left", show_lines=False)
    for r in runs:
        table.add_row(str(r.run_id), r.status, ", ".join(r.campaigns) or "-", *_cells(r.figures))
    if campaigns:
        table.add_section()
        for c in campaigns:
            table.add_row("total", f"{len(c.run_ids)} run(s)", c.name, *_cells(c.figures), style="bold")
    out.print(table)
    devices = [f"run {r.run_id}: " + ", ".join(_device_text(kind, d) for kind, d in r.devices.items())
               for r in runs if r.devices]
    for line in devices:
        out.print(line, soft_wrap=True)
    priced = "cost = device-hours x the run's price per device-hour" + (
        f" (runs without one: {price:g}, the configured price)" if price > 0 else
        " (set price_per_device_hour to see a cost)")
    out.print(f"{priced}; percentiles over at most the newest {MAX_ROWS:,} images of a run or campaign; totals span "
              "all of a campaign's runs.", soft_wrap=True)


def _device_text(kind: str, d: dict) -> str:
    parts = [f"{kind} {float(d.get('seconds', 0.0)):.1f} device-s"]
    if "peak_memory_bytes" in d:
        parts.append(f"peak {d['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "gpu_utilisation" in d:
        parts.append(f"GPU {d['gpu_utilisation']:.0f} % busy")
    return " ".join(parts)

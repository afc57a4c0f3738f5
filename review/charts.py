"""Bar and line charts as geometry for server-rendered inline SVG (the metrics page): no JavaScript, nothing from
another site (the gallery's Content-Security-Policy allows neither), and every label goes through the template's
autoescaping. A chart is numbers and strings; ``templates/_charts.html`` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

__all__ = ["Bar", "Chart", "Series", "bar_chart", "line_chart", "nice_ticks"]

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 48  # margins: y tick labels left, x labels below
PALETTE = ("#3b6ea5", "#d9822b", "#8e44ad", "#2e8b57")


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: str  # as shown in the bar's tooltip


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    points: str  # SVG polyline points: "x,y x,y ..." (a gap where a value is missing starts a new polyline)
    segments: tuple[str, ...]
    dots: tuple[tuple[float, float, str], ...]  # x, y, tooltip


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    unit: str
    description: str  # for screen readers: what the chart shows; the table beside it has the numbers
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    right: int = WIDTH - RIGHT
    bottom: int = HEIGHT - BOTTOM
    y_ticks: tuple[tuple[float, str], ...] = ()  # y position, label
    x_labels: tuple[tuple[float, str], ...] = ()
    bars: tuple[Bar, ...] = ()
    series: tuple[Series, ...] = field(default_factory=tuple)
    empty: bool = False


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """0 and evenly spaced round values (1, 2 or 5 x 10^k apart) up to at least ``top``."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}"


def _frame(chart_id: str, title: str, unit: str, description: str, labels: Sequence[str],
           values: Sequence[float]) -> tuple[Chart, list[float], float]:
    """The empty chart with its axes for ``values``; the x centre of each label's slot and the y scale."""
    ticks = nice_ticks(max(values, default=0.0))
    chart = Chart(chart_id, title, unit, description)
    plot_h = chart.bottom - chart.top
    scale = plot_h / ticks[-1]
    slot = (chart.right - chart.left) / max(1, len(labels))
    centres = [chart.left + slot * (i + 0.5) for i in range(len(labels))]
    every = max(1, math.ceil(len(labels) / 12))  # at most ~12 x labels, so they do not overlap
    y_ticks = tuple((round(chart.bottom - t * scale, 1), _fmt(t)) for t in ticks)
    x_labels = tuple((round(c, 1), label) for i, (c, label) in enumerate(zip(centres, labels)) if i % every == 0)
    return replace(chart, y_ticks=y_ticks, x_labels=x_labels, empty=not values), centres, scale


def bar_chart(chart_id: str, title: str, unit: str, labels: Sequence[str], values: Sequence[float | None],
              description: str) -> Chart:
    """One bar per label (a missing value: no bar)."""
    known = [v for v in values if v is not None]
    chart, centres, scale = _frame(chart_id, title, unit, description, labels, known)
    slot = (chart.right - chart.left) / max(1, len(labels))
    width = max(2.0, slot * 0.7)
    bars = []
    for centre, label, value in zip(centres, labels, values):
        if value is None:
            continue
        h = value * scale
        bars.append(Bar(round(centre - width / 2, 1), round(chart.bottom - h, 1), round(width, 1), round(h, 1), label,
                        f"{_fmt(value)} {unit}".strip()))
    return replace(chart, bars=tuple(bars), empty=not bars)


def line_chart(chart_id: str, title: str, unit: str, labels: Sequence[str],
               series: Sequence[tuple[str, Sequence[float | None]]], description: str) -> Chart:
    """One line per series over the labels; a missing value breaks its line."""
    known = [v for _, values in series for v in values if v is not None]
    chart, centres, scale = _frame(chart_id, title, unit, description, labels, known)
    drawn = []
    for k, (name, values) in enumerate(series):
        segments: list[list[str]] = [[]]
        dots = []
        for centre, label, value in zip(centres, labels, values):
            if value is None:
                if segments[-1]:
                    segments.append([])
                continue
            x, y = round(centre, 1), round(chart.bottom - value * scale, 1)
            segments[-1].append(f"{x},{y}")
            dots.append((x, y, f"{name} {label}: {_fmt(value)} {unit}".strip()))
        parts = tuple(" ".join(seg) for seg in segments if seg)
        drawn.append(Series(name, PALETTE[k % len(PALETTE)], " ".join(parts), parts, tuple(dots)))
    return replace(chart, series=tuple(drawn), empty=not known)

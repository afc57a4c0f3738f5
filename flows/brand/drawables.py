"""A kit's fonts and logos as drawn: opened once per size, SVG logos rendered at the size they are drawn (resvg, no
system fonts), cached per process by path, size and the kit's sha256 (a file replaced under the same name is
another kit's file)."""

from __future__ import annotations

import functools
import re

from PIL import Image, ImageFont

__all__ = ["font", "logo", "logo_size", "render_svg"]


_FONTS: dict[tuple[str, int, str], ImageFont.FreeTypeFont] = {}
_LOGOS: dict[tuple[str, int, int, str], Image.Image] = {}


def font(path: str, size: int, stamp: str = "") -> ImageFont.FreeTypeFont:
    key = (path, size, stamp)
    found = _FONTS.get(key)
    if found is None:
        found = ImageFont.truetype(path, size)
        if len(_FONTS) > 512:
            _FONTS.clear()
        _FONTS[key] = found
    return found


def render_svg(path: str, width: int | None, height: int | None) -> Image.Image:
    import io

    import resvg_py

    # System fonts are skipped: a logo's text must come from its own outlines, the same on every machine.
    png = resvg_py.svg_to_bytes(svg_path=path, width=width, height=height, skip_system_fonts=True)
    return Image.open(io.BytesIO(bytes(png))).convert("RGBA")


SVG_SIDE = 1000  # the size an SVG logo is taken to have: only its aspect counts, it is drawn at the size it is used
MAX_ASPECT = 50.0
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def svg_aspect(path: str) -> float:
    """An SVG's width / height from its root element's ``viewBox`` (else ``width`` and ``height``), read without
    drawing it: a file that says it is 100,000 px wide is never rendered at that size. ValueError when it states
    neither, or an aspect beyond 1:50."""
    from xml.etree.ElementTree import iterparse

    for _, element in iterparse(path, events=("start",)):
        attrs = element.attrib
        break
    else:
        raise ValueError("no root element")
    numbers = [float(m.group(1)) for m in (_NUMBER.match(v) for v in re.split(r"[\s,]+", attrs.get("viewBox", "").strip())) if m]
    if len(numbers) == 4 and numbers[2] > 0 and numbers[3] > 0:
        aspect = numbers[2] / numbers[3]
    else:
        w, h = (_NUMBER.match(attrs.get(k, "")) for k in ("width", "height"))
        if not (w and h and float(w.group(1)) > 0 and float(h.group(1)) > 0):
            raise ValueError("the SVG states no viewBox and no width and height")
        aspect = float(w.group(1)) / float(h.group(1))
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        raise ValueError(f"its aspect {aspect:.3g} is beyond 1:{MAX_ASPECT:g}")
    return aspect


@functools.lru_cache(maxsize=64)
def logo_size(path: str, stamp: str = "") -> tuple[int, int]:
    if path.lower().endswith(".svg"):
        aspect = svg_aspect(path)
        return (SVG_SIDE, max(1, round(SVG_SIDE / aspect))) if aspect >= 1 else (max(1, round(SVG_SIDE * aspect)), SVG_SIDE)
    with Image.open(path) as probe:
        return probe.size


def logo(path: str, width: int, height: int, stamp: str = "") -> Image.Image:
    key = (path, width, height, stamp)
    logo = _LOGOS.get(key)
    if logo is None:
        nw, nh = logo_size(path, stamp)
        scale = min(width / nw, height / nh)
        tw, th = max(1, round(nw * scale)), max(1, round(nh * scale))
        if path.lower().endswith(".svg"):
            logo = render_svg(path, tw, th)  # drawn at its size: crisp edges at any scale
            if logo.size != (tw, th):
                logo = logo.resize((tw, th), Image.Resampling.LANCZOS)
        else:
            with Image.open(path) as probe:
                logo = probe.convert("RGBA").resize((tw, th), Image.Resampling.LANCZOS)
        if len(_LOGOS) > 64:
            _LOGOS.clear()
        _LOGOS[key] = logo
    return logo

"""A kit's fonts and logos as drawn: opened once per size, SVG logos rendered at the size they are drawn (resvg, no
system fonts), cached per process by path, size and the kit's sha256 (a file replaced under the same name is
another kit's file)."""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=64)
def logo_size(path: str, stamp: str = "") -> tuple[int, int]:
    if path.lower().endswith(".svg"):
        image = render_svg(path, None, None)
        return image.size
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
            logo = render_svg(path, tw, None)  # drawn at its size: crisp edges at any scale
            if logo.size != (tw, th):
                logo = logo.resize((tw, th), Image.Resampling.LANCZOS)
        else:
            with Image.open(path) as probe:
                logo = probe.convert("RGBA").resize((tw, th), Image.Resampling.LANCZOS)
        if len(_LOGOS) > 64:
            _LOGOS.clear()
        _LOGOS[key] = logo
    return logo

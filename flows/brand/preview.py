"""A brand kit's overlay previewed without a render: a computed stand-in picture of the channel's size, and the
overlay's boxes outlined on the drawn result (``adforge brand preview``). Nothing here is random, so the same inputs
give the same pixels and a preview can be diffed or kept in a review thread."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from engine.packshot import ProductLayer

__all__ = ["BACKGROUNDS", "GUIDE_COLOURS", "guides", "placeholder"]

BACKGROUNDS = ("light", "dark", "busy")

# Guide colours (RGB), one per thing outlined, chosen to stay apart from each other on any placeholder.
GUIDE_COLOURS: dict[str, tuple[int, int, int]] = {
    "safe": (255, 48, 48),
    "logo": (255, 0, 220),
    "headline": (0, 200, 255),
    "body": (255, 170, 0),
    "cta": (40, 230, 90),
    "product": (255, 240, 0),
}


def _gradient(size: tuple[int, int], start: tuple[int, int, int], end: tuple[int, int, int]) -> Image.Image:
    """A diagonal two-colour gradient, top left to bottom right."""
    w, h = size
    t = (np.arange(w, dtype=np.float32)[None, :] / max(1, w - 1) + np.arange(h, dtype=np.float32)[:, None] / max(1, h - 1)) / 2
    a, b = np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32)
    pixels = np.rint(a + (b - a) * t[..., None])
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# Busy: soft blobs of light and dark colours, so every text box meets both and the contrast choice shows.
_BLOB_COLOURS = ((238, 96, 85), (250, 214, 120), (40, 62, 110), (120, 200, 170), (245, 245, 235), (25, 25, 30),
                 (150, 110, 200), (90, 160, 230))
_BLOBS = 14
_GOLDEN = (math.sqrt(5) - 1) / 2


def _blobs(size: tuple[int, int]) -> Image.Image:
    """Soft colour blobs placed by a low-discrepancy sequence (no random numbers at all, so no seed, library or
    platform can change them), drawn at an eighth of the size and resized up: cheap even for print A4."""
    w, h = size
    sw, sh = max(8, math.ceil(w / 8)), max(8, math.ceil(h / 8))
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    xs, ys = xs / sw, ys / sh
    aspect = sw / sh
    acc = np.zeros((sh, sw, 3), dtype=np.float32) + np.asarray((128, 128, 128), dtype=np.float32) * 0.3
    weight = np.full((sh, sw), 0.3, dtype=np.float32)
    for i in range(_BLOBS):
        cx, cy = (i * _GOLDEN + 0.17) % 1.0, (i * _GOLDEN * _GOLDEN + 0.61) % 1.0
        radius = 0.12 + 0.1 * ((i * 0.37) % 1.0)
        dx = (xs - cx) * aspect if aspect > 1 else xs - cx
        dy = ys - cy if aspect > 1 else (ys - cy) / aspect
        g = np.exp(-(dx * dx + dy * dy) / (2 * radius * radius)) ** 2  # squared: firmer blobs, more edges to cross
        acc += g[..., None] * np.asarray(_BLOB_COLOURS[i % len(_BLOB_COLOURS)], dtype=np.float32)
        weight += g
    small = Image.fromarray(np.clip(np.rint(acc / weight[..., None]), 0, 255).astype(np.uint8), "RGB")
    return small.resize((w, h), Image.Resampling.BICUBIC)


def placeholder(size: tuple[int, int], background: str) -> Image.Image:
    """The stand-in picture a preview draws on: ``light`` / ``dark`` gradients or ``busy`` blobs, always the same."""
    if background == "light":
        return _gradient(size, (247, 242, 232), (206, 222, 236))
    if background == "dark":
        return _gradient(size, (18, 22, 36), (62, 38, 72))
    if background == "busy":
        return _blobs(size)
    raise ValueError(f"unknown background {background!r}")


def _dashed_rectangle(draw, box: tuple[int, int, int, int], colour: tuple[int, int, int, int], width: int) -> None:
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    dash, gap = 6 * width, 4 * width
    for (ax, ay), (bx, by) in (((x, y), (x1, y)), ((x1, y), (x1, y1)), ((x, y1), (x1, y1)), ((x, y), (x, y1))):
        length = max(abs(bx - ax), abs(by - ay))
        pos = 0
        while pos <= length:
            end = min(length, pos + dash)
            if ax == bx:
                draw.line((ax, ay + pos, ax, ay + end), fill=colour, width=width)
            else:
                draw.line((ax + pos, ay, ax + end, ay), fill=colour, width=width)
            pos += dash + gap


def _label_origin(name: str, box: tuple[int, int, int, int], tab: tuple[int, int], safe: list[int],
                  canvas: tuple[int, int]) -> tuple[int, int]:
    """Where a label's tab goes, off what the box frames. A text sits at its box's top in the upper half of the
    safe zone and at its bottom otherwise (flows.brand.compose), so its label takes the other end, inside. The
    logo's and the product's boxes are tight around them: their labels go just outside, above or else below."""
    x, y, w, h = box
    tw, th = tab
    if name in ("logo", "product"):
        return x, y - th if y - th >= 0 else min(canvas[1] - th, y + h)
    text_at_top = y + h / 2 <= safe[1] + safe[3] / 2
    return x, y + h - th if text_at_top else y


def guides(canvas: Image.Image, record: dict, product: ProductLayer | None) -> Image.Image:
    """``canvas`` with the safe zone (dashed) and each element's box outlined and labelled, from the overlay's
    record: what compose actually used. Nothing is drawn on the product's opaque pixels: a preview shows them
    exact, as delivery does."""
    size = canvas.size
    line = max(1, round(min(size) / 360))
    label_px = max(9, min(28, round(min(size) / 40)))
    font = ImageFont.load_default(label_px)  # Pillow's bundled font: the same glyphs on every machine
    pad = max(1, label_px // 5)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    safe = list(record["safe"])
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    if product is not None:
        boxes.append(("product", product.box))
    if "logo" in record:
        boxes.append(("logo", tuple(record["logo"]["box"])))
    for element in ("headline", "body", "cta"):
        if element in record:
            boxes.append((element, tuple(record[element]["box"])))
    _dashed_rectangle(draw, tuple(safe), (*GUIDE_COLOURS["safe"], 255), line)
    for name, (x, y, w, h) in boxes:
        colour = GUIDE_COLOURS[name]
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(*colour, 255), width=line)
        # A tab of the box's colour under the label, so it reads on any picture.
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        tab = (right - left + 2 * pad, bottom - top + 2 * pad)
        tx, ty = _label_origin(name, (x, y, w, h), tab, safe, size)
        draw.rectangle((tx, ty, tx + tab[0] - 1, ty + tab[1] - 1), fill=(*colour, 230))
        draw.text((tx + pad - left, ty + pad - top), name, font=font, fill=(0, 0, 0, 255))
    # The safe zone's label goes at its bottom right, in the margin below it where there is room, else just inside.
    sl, st, sw, sh = safe
    left, top, right, bottom = draw.textbbox((0, 0), "safe zone", font=font)
    tw, th = right - left, bottom - top
    below = st + sh + line + 1
    ty = below if below + th <= size[1] else st + sh - th - line - 2
    draw.text((sl + sw - tw - line - 2 - left, ty - top), "safe zone", font=font, fill=(*GUIDE_COLOURS["safe"], 255))
    if product is not None:
        alpha = np.asarray(layer.getchannel("A")).copy()
        alpha[product.opaque] = 0
        layer.putalpha(Image.fromarray(alpha, "L"))
    out = canvas.convert("RGBA")
    out.alpha_composite(layer)
    return out.convert("RGB")

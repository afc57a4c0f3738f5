"""WCAG 2.x contrast: relative luminance of sRGB colours, the ratio of two, and the ratio of a text colour against
the pixels actually behind a text.

Behind a text is not one colour, so the ratio is taken against the background pixel *least* distinct from the text
among those under and around its glyphs (within a ring a few pixels wide): a text that passes is readable over the
whole of what it covers, not just on average.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["RGB", "contrast_ratio", "luminance", "luminance_map", "mix", "mixed_luminance", "ratio_against", "ring"]

RGB = tuple[int, int, int]


def _linear(c: np.ndarray) -> np.ndarray:
    c = c / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def luminance(colour: RGB) -> float:
    r, g, b = _linear(np.asarray(colour, dtype=np.float64))
    return float(0.2126 * r + 0.7152 * g + 0.0722 * b)


_LINEAR_LUT = _linear(np.arange(256, dtype=np.float64))
_WEIGHTS = (0.2126, 0.7152, 0.0722)
_LUTS = [(_LINEAR_LUT * w).astype(np.float32) for w in _WEIGHTS]


def luminance_map(pixels: np.ndarray) -> np.ndarray:
    """Relative luminance of every pixel of an (..., 3) uint8 array (float32, by table lookup)."""
    p = pixels[..., :3]
    return _LUTS[0][p[..., 0]] + _LUTS[1][p[..., 1]] + _LUTS[2][p[..., 2]]


def mix(pixels: np.ndarray, colour: RGB, step: int) -> np.ndarray:
    """``pixels`` (uint8) covered by ``colour`` at ``step`` twentieths, rounded: integer arithmetic, so the pixels
    judged and the pixels drawn are the same on every machine."""
    mixed = pixels.astype(np.uint16) * (20 - step) + np.asarray(colour, dtype=np.uint16) * step + 10
    return (mixed // 20).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _mixed_tables(colour: RGB, step: int) -> tuple[np.ndarray, ...]:
    values = mix(np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1), colour, step)
    return tuple(lut[values[:, c]] for c, lut in enumerate(_LUTS))


def mixed_luminance(pixels: np.ndarray, colour: RGB, step: int) -> np.ndarray:
    """``luminance_map(mix(pixels, colour, step))`` by table lookup, without making the mixed pixels."""
    r, g, b = _mixed_tables(tuple(colour), step)
    return r[pixels[..., 0]] + g[pixels[..., 1]] + b[pixels[..., 2]]


def contrast_ratio(a: RGB | float, b: RGB | float) -> float:
    la = a if isinstance(a, float) else luminance(a)
    lb = b if isinstance(b, float) else luminance(b)
    hi, lo = max(la, lb), min(la, lb)
    return (hi + 0.05) / (lo + 0.05)


def ring(ink: np.ndarray, width: int) -> np.ndarray:
    """The pixels within ``width`` of the ``ink`` mask (bool, H x W) but not ink themselves."""
    import cv2

    k = 2 * max(1, width) + 1
    grown = cv2.dilate(ink.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
    return grown & ~ink


def ratio_against(text_luminance: float, background: np.ndarray) -> float:
    """The contrast of a text of ``text_luminance`` against background luminances (1-D), by the worst of them: the
    brightest behind a dark text, the darkest behind a light one."""
    if background.size == 0:
        return 21.0
    brighter = text_luminance >= float(background.mean())
    worst = float(background.max() if brighter else background.min())
    return contrast_ratio(text_luminance, worst)

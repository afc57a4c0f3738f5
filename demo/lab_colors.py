"""Colour names for the demo's palette: sRGB -> CIE L*a*b* and the nearest :data:`~demo.scenes.COLORS` entry."""

from __future__ import annotations

import numpy as np

from demo.scenes import COLORS

__all__ = ["COLOR_NAMES", "classify_color", "nearest_color_index", "rgb_to_lab"]

_XYZ_FROM_RGB = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=np.float32,
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
_XYZ_OVER_WHITE = _XYZ_FROM_RGB / _WHITE_D65[:, None]  # rows: linear RGB -> X/Xn, Y/Yn, Z/Zn


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


_LINEAR_LUT = _srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of sRGB values in [0, 255], any leading shape ``(..., 3)`` (uint8 input takes a fast
    lookup-table path). Plain elementwise arithmetic: no BLAS call, so no BLAS threads spinning on the shared
    cores."""
    rgb = np.asarray(rgb)
    c = _LINEAR_LUT[rgb] if rgb.dtype == np.uint8 else _srgb_to_linear(rgb.astype(np.float32) / 255.0)
    flat = c.reshape(-1, 3)
    r, g, b = flat[:, 0], flat[:, 1], flat[:, 2]
    f = []
    for row in _XYZ_OVER_WHITE:
        t = np.maximum(row[0] * r + row[1] * g + row[2] * b, np.float32(1e-9))
        ft = np.power(t, np.float32(1.0 / 3.0))
        small = t <= 0.008856
        if small.any():
            ft[small] = 7.787 * t[small] + 16.0 / 116.0
        f.append(ft)
    lab = np.empty(flat.shape, dtype=np.float32)
    lab[:, 0] = 116.0 * f[1] - 16.0
    lab[:, 1] = 500.0 * (f[0] - f[1])
    lab[:, 2] = 200.0 * (f[1] - f[2])
    return lab.reshape(c.shape)


COLOR_NAMES = tuple(COLORS)
_PALETTE_LAB = rgb_to_lab(np.array([COLORS[n] for n in COLOR_NAMES], dtype=np.float32))


def nearest_color_index(rgb: np.ndarray) -> np.ndarray:
    lab = rgb_to_lab(rgb)
    d = ((lab[..., None, :] - _PALETTE_LAB) ** 2).sum(-1)
    return d.argmin(-1)


def classify_color(rgb) -> str:
    """Name of the :data:`~demo.scenes.COLORS` entry nearest to ``rgb`` (0-255) by CIE76 distance in
    L*a*b*: perceptually even enough that the nearest name is the one a person would give (plain RGB distance
    overweights differences among dark colours and underweights them among light ones). The palette's closest
    pair (blue/purple) is ~28 apart; a +-12 per-channel shift moves a palette colour by up to ~20 (black the
    most), and every palette colour so shifted is still nearer its own name than any other by 12 or more."""
    return COLOR_NAMES[int(nearest_color_index(np.asarray(rgb, dtype=np.float32).reshape(3)))]

"""The background model: a planar RGB fit through the frame's side medians, refined around the objects.

It is kept on a grid at 1/4 resolution (the background is slow by construction) and upsampled bilinearly; see
:mod:`demo.evaluate` for where it fits in the pipeline.
"""

from __future__ import annotations

import numpy as np

from demo.masks import dilate

__all__ = ["FRAME_FRACTION", "REFINE_SIGMA", "planar_background", "refine_background", "side_medians", "upsample"]

FRAME_FRACTION = 0.06  # width of the border frame the background is measured on


def side_medians(img: np.ndarray) -> dict[str, np.ndarray]:
    s = img.shape[0]
    w = max(2, round(FRAME_FRACTION * s))
    return {
        "top": np.median(img[:w].reshape(-1, 3), axis=0),
        "bottom": np.median(img[-w:].reshape(-1, 3), axis=0),
        "left": np.median(img[:, :w].reshape(-1, 3), axis=0),
        "right": np.median(img[:, -w:].reshape(-1, 3), axis=0),
        "frame": np.median(np.concatenate([img[:w].reshape(-1, 3), img[-w:].reshape(-1, 3),
                                           img[w:-w, :w].reshape(-1, 3), img[w:-w, -w:].reshape(-1, 3)]), axis=0),
    }


_LOW = 4  # the background is modelled at 1/4 resolution (it is slow by construction) and upsampled bilinearly
REFINE_SIGMA = 8.0  # pixels: scale of the background variations the refinement follows
_GAUSS: dict[int, np.ndarray] = {}


def _gauss_matrix(n: int) -> np.ndarray:
    """(n, n) Gaussian of :data:`REFINE_SIGMA` full-resolution pixels on an n-sided model grid."""
    if n not in _GAUSS:
        i = np.arange(n, dtype=np.float32)
        _GAUSS[n] = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * (REFINE_SIGMA / _LOW) ** 2)).astype(np.float32)
    return _GAUSS[n]


# Small products are done with elementwise numpy / einsum rather than matmul: BLAS would start threads that
# spin for a while after every call, doubling the CPU this takes on a machine shared with training.

_PHASES = ((0.375, 0.625, 0.0), (0.125, 0.875, 0.0), (0.0, 0.875, 0.125), (0.0, 0.625, 0.375))


def _upsample_axis(x: np.ndarray, axis: int) -> np.ndarray:
    """4x bilinear upsampling along ``axis`` (-1 or -2), pixel centres aligned and edges clamped (as Pillow's
    BILINEAR resize): output pixel 4j + k sits at grid position j + (2k - 3) / 8, between j - 1, j and j + 1."""
    if axis == -1:
        p = np.concatenate([x[..., :1], x, x[..., -1:]], -1)
        taps = (p[..., :-2], p[..., 1:-1], p[..., 2:])
        out = np.empty(x.shape + (4,), dtype=np.float32)
        for k, weights in enumerate(_PHASES):
            out[..., k] = sum(w * t for w, t in zip(weights, taps) if w)
        return out.reshape(*x.shape[:-1], 4 * x.shape[-1])
    p = np.concatenate([x[..., :1, :], x, x[..., -1:, :]], -2)
    taps = (p[..., :-2, :], p[..., 1:-1, :], p[..., 2:, :])
    out = np.empty(x.shape[:-1] + (4, x.shape[-1]), dtype=np.float32)
    for k, weights in enumerate(_PHASES):
        out[..., k, :] = sum(w * t for w, t in zip(weights, taps) if w)
    return out.reshape(*x.shape[:-2], 4 * x.shape[-2], x.shape[-1])


def upsample(low: np.ndarray) -> np.ndarray:
    """(C, n, n) model grid -> (C, 4n, 4n), bilinear."""
    return _upsample_axis(_upsample_axis(low, -2), -1)


def _pool(x: np.ndarray) -> np.ndarray:
    """Sum over 4x4 blocks of the last two axes (the canvas side is a multiple of 4)."""
    x = x[..., 0::4, :] + x[..., 1::4, :] + x[..., 2::4, :] + x[..., 3::4, :]
    return x[..., 0::4] + x[..., 1::4] + x[..., 2::4] + x[..., 3::4]


def _gauss(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Gaussian-smooth the last two axes of a (C, n, n) grid with the (n, n) kernel matrix ``k``."""
    return np.einsum("cik,lk->cil", np.einsum("ij,cjk->cik", k, x), k)


def planar_background(sides: dict[str, np.ndarray], s: int) -> np.ndarray:
    """Planar RGB background (3, n, n) through the four side medians, at the centres of the model grid.

    The side strips' centres sit at u = 0 and u = 1; the top and bottom medians pin the vertical slope, the left
    and right ones the horizontal slope, and all four the level (for a linear ramp, a side strip's median is the
    ramp's value at the middle of that side)."""
    w = max(2, round(FRAME_FRACTION * s))
    n = s // _LOW
    gy = (sides["bottom"] - sides["top"]).astype(np.float32)[:, None, None]
    gx = (sides["right"] - sides["left"]).astype(np.float32)[:, None, None]
    c = ((sides["top"] + sides["bottom"] + sides["left"] + sides["right"]) / 4).astype(np.float32)[:, None, None]
    c = c - 0.5 * gx - 0.5 * gy
    u = (((np.arange(n, dtype=np.float32) + 0.5) * _LOW - 0.5) - (w - 1) / 2) / (s - w)
    return (c + gx * u[None, None, :] + gy * u[None, :, None]).astype(np.float32)


def refine_background(img: np.ndarray, bg_low: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Follow slow background variations (blotches, shading) that the planar model misses: add to the model grid
    ``bg_low`` (``bg`` is it upsampled; both channel-first, like ``img``) the residual ``img - bg`` smoothed by
    normalised Gaussian convolution over the pixels away from the foreground ``fg``, so the holes the objects
    leave are filled in from around them."""
    keep = ~dilate(fg, 3)
    if keep.mean() < 0.3:  # too little background to learn from: keep the model
        return bg_low
    k = _gauss_matrix(img.shape[-1] // _LOW)
    weight = keep.astype(np.float32)
    den = np.maximum(_gauss(_pool(weight)[None], k)[0], 1e-6)
    num = _gauss(_pool((img - bg) * weight), k)
    return (bg_low + num / den).astype(np.float32)

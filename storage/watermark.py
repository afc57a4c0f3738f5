"""adforge's invisible watermark: a spread-spectrum mark of 64 bits in the luma (Y) channel.

The format (fixed forever: changing ``CELL``, ``TILE`` or the layout makes older marks unreadable; the amplitude,
smoothing and decoder constants are tuning, measured in bench/watermark_survival.py):

* the picture is cut into cells of ``CELL`` x ``CELL`` pixels; ``TILE`` x ``TILE`` cells (128 x 128 pixels) form a
  tile that repeats over the picture from its top-left corner;
* each of the tile's 1,024 cells belongs to one of the 64 payload bits (16 cells per bit) and has a sign (8 cells
  of each bit +1, 8 cells -1), by a permutation derived from sha256 (:func:`_layout`), not from a random generator
  whose stream could change between numpy versions;
* the pattern is ``cell value = sign * (+1 if bit else -1)``, upsampled to pixels, smoothed by a Gaussian of
  ``SMOOTH`` px (no hard cell edges), and added to luma (the same amount to R, G and B) with an amplitude that
  follows the local detail of the picture (``AMP_FLAT`` levels in flat areas and smooth gradients, so that a pixel
  moves by one level at most there; up to ``AMP_MAX`` in busy ones: noise hides in texture); then rounded and
  clipped to 0..255.

Decoding takes luma, subtracts a local mean (a Gaussian of ``HIGHPASS`` px: the picture's own content is mostly
low-frequency), clips the residual (edges would drown the mark), folds it onto one tile (every pixel adds to its
position modulo 128, partial tiles included, so a 728x90 banner reads too), sums it per cell, and correlates each
bit's 16 cells with their signs: the bit is the sign of the correlation. Each correlation over the square root of
its cells' energy is a z-score, close to a standard normal on an unmarked picture whatever its content (the signs
are balanced and random); the **confidence** is the mean over the 64 bits of ``erf(|z| / sqrt 2)`` (one minus the
two-sided p-value): about 0.5 on unrelated pictures, close to 1 on marked ones.

:func:`search` reads a crop: the crop moves the tile grid by an unknown offset (0..127 each way); the folded
residual is cross-correlated with each bit's pattern by FFT, the offset with the largest total correlation wins, and
the picture is read there. The tile holds absolute bit positions, so a crop reads as the same payload, no rotation
to guess.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from storage.watermark_payload import MAGIC, PAYLOAD_BITS

__all__ = ["CHECK_CONFIDENCE", "STRENGTHS", "embed_checked", "MIN_CELLS", "MIN_TOTAL_CELLS", "THRESHOLD", "Reading", "can_carry", "cells_per_bit", "embed", "read",
           "search"]

CELL = 4  # pixels per cell side
TILE = 32  # cells per tile side
TILE_PX = CELL * TILE  # 128
# The Gaussian (px) that takes the cell edges off the pattern: with 1.0, 2 of 24 gradients lost a bit at JPEG 50.
SMOOTH = 0.8
# Luma levels in flat areas (a gradient, a studio backdrop): under 1.5, so a pixel there moves by one level at most;
# with 1.3, 1 of 20 gradients lost a bit at JPEG 50.
AMP_FLAT = 1.45
AMP_GAIN = 0.5  # extra levels per level of local detail above DETAIL_FLOOR
AMP_MAX = 4.0
ACTIVITY = 3.0  # the Gaussian (px) of the local detail: luma minus its local mean, root-mean-squared
# Detail up to this (levels) counts as flat: the steps of an 8-bit gradient and faint noise hide no mark, and with
# it a gradient's pixels change by one level at most.
DETAIL_FLOOR = 1.0
# The decoder's local mean (px): half a cell (with 4.0, 55 of 60 small pictures read right after JPEG 50; 2.0: 59).
HIGHPASS = 2.0
CLIP = 6.0  # the decoder's residual clip (levels): texture and edges beyond it are not the mark
_VERSION = b"adforge watermark v1"

# A picture carries the mark when every bit has at least MIN_CELLS cells in it and the picture MIN_TOTAL_CELLS in
# all (60 per bit). Measured on 40 natural-ish pictures per size (half without grain), marked and saved as JPEG 50,
# read right: 256x128 39/40 (not carried), 192x192 40/40 but 38/40 with a blurrier pattern (not carried either);
# 256x240, 256x256, 728x90 (34 cells of its rarest bit), 160x600 40/40.
MIN_CELLS = 24
MIN_TOTAL_CELLS = 3840
# The confidence from which a reading counts as a mark: 383 unrelated pictures read about 0.5 (at most 0.64 as
# they are), at the searching decoder's best offset about 0.63 (at most 0.71); marked ones 0.93 and more after
# JPEG 50 (bench/watermark_survival.py).
THRESHOLD = 0.8
# embed_checked: a fresh mark must read back this surely (a JPEG re-encode costs some), at one of these strengths.
CHECK_CONFIDENCE = 0.9
CHECK_WEAKEST_Z = 1.0
STRENGTHS = (1.0, 2.0, 3.0, 4.0)
# A reading is confident only when every bit's |z| reaches this: marked pictures after JPEG 50 keep >= 0.98 (the
# example campaign's assets), unmarked ones almost never have all 64 bits so far from 0.
WEAKEST_Z = 0.5


@lru_cache(maxsize=64)
def cells_per_bit(width: int, height: int) -> int:
    """The fewest cells that any one bit has in a picture of this size (tiles repeat from the top-left corner)."""
    bit, _ = _layout()
    rows, cols = height // CELL, width // CELL
    grid = np.tile(bit, (-(-rows // TILE), -(-cols // TILE)))[:rows, :cols]
    return int(np.bincount(grid.ravel(), minlength=PAYLOAD_BITS).min())


def can_carry(width: int, height: int) -> bool:
    """Whether a picture of this size carries the mark reliably (see MIN_CELLS)."""
    return (width // CELL) * (height // CELL) >= MIN_TOTAL_CELLS and cells_per_bit(width, height) >= MIN_CELLS


@lru_cache(maxsize=1)
def _layout() -> tuple[np.ndarray, np.ndarray]:
    """Each cell's bit (0..63) and sign (+1 / -1), as (TILE, TILE) arrays: the format's fixed permutation."""
    n = TILE * TILE
    keys = [hashlib.sha256(_VERSION + b" cell %d" % j).digest() for j in range(n)]
    order = sorted(range(n), key=lambda j: keys[j])
    bit, sign = np.empty(n, np.int64), np.empty(n, np.float64)
    for k, j in enumerate(order):
        bit[j] = k % PAYLOAD_BITS
        sign[j] = 1.0 if (k // PAYLOAD_BITS) % 2 == 0 else -1.0  # 8 cells of each sign per bit
    return bit.reshape(TILE, TILE), sign.reshape(TILE, TILE)


def _bits_of(payload: bytes) -> np.ndarray:
    if len(payload) * 8 != PAYLOAD_BITS:
        raise ValueError(f"a watermark payload is {PAYLOAD_BITS // 8} bytes, got {len(payload)}")
    return np.unpackbits(np.frombuffer(payload, dtype=np.uint8))


def _tile_pattern(payload: bytes) -> np.ndarray:
    """The smoothed pattern of one tile (TILE_PX x TILE_PX, values about -1..1), periodic at its edges."""
    bit, sign = _layout()
    cells = sign * (2.0 * _bits_of(payload)[bit] - 1.0)
    px = np.repeat(np.repeat(cells, CELL, axis=0), CELL, axis=1)
    pad = 4 * CELL
    wrapped = np.pad(px, pad, mode="wrap")  # smoothed as the repeating pattern it is
    return cv2.GaussianBlur(wrapped, (0, 0), SMOOTH)[pad:-pad, pad:-pad]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def embed(image: Image.Image, payload: bytes, keep: tuple[int, int, int, int] | None = None,
          strength: float = 1.0) -> Image.Image:
    """``image`` (RGB) with ``payload`` (8 bytes) embedded; pixels inside ``keep`` (x, y, w, h) left exactly as
    they were. ``strength`` scales the amplitude everywhere (:func:`embed_checked` raises it for busy pictures)."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    tile = _tile_pattern(payload)
    pattern = np.tile(tile, (-(-h // TILE_PX), -(-w // TILE_PX)))[:h, :w]
    y = _luma(rgb.astype(np.float64))
    detail = y - cv2.GaussianBlur(y, (0, 0), ACTIVITY)  # texture, not the slope of a smooth gradient
    spread = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), ACTIVITY))
    amp = strength * np.clip(AMP_FLAT + AMP_GAIN * np.maximum(spread - DETAIL_FLOOR, 0.0), AMP_FLAT, AMP_MAX)
    marked = np.clip(np.rint(rgb + (amp * pattern)[..., None]), 0, 255).astype(np.uint8)
    if keep is not None:
        x, y0, kw, kh = keep
        xa, ya = max(0, x), max(0, y0)
        marked[ya:y0 + kh, xa:x + kw] = rgb[ya:y0 + kh, xa:x + kw]
    return Image.fromarray(marked, "RGB")


def embed_checked(image: Image.Image, payload: bytes, keep: tuple[int, int, int, int] | None = None
                  ) -> tuple[Image.Image, bool]:
    """:func:`embed`, then read back: a picture whose own texture drowns the mark (saturated noise, dense foliage at
    a small size) is marked again at 2x and 3x the amplitude, which such texture still hides. The marked picture,
    and whether the mark reads back with :data:`CHECK_CONFIDENCE` (a mark that does not is no proof: callers do not
    record it)."""
    marked = image
    for strength in STRENGTHS:
        marked = embed(image, payload, keep, strength)
        reading = read(marked)
        if (reading is not None and reading.payload == payload and reading.confidence >= CHECK_CONFIDENCE
                and reading.weakest >= CHECK_WEAKEST_Z):
            return marked, True
    return marked, False


@dataclass(frozen=True)
class Reading:
    """What the decoder read: the payload, the confidence (about 0.5 unmarked, near 1 marked), the number of cells
    that took part, and the tile offset it was read at ((0, 0) unless searched)."""

    payload: bytes
    confidence: float
    cells: int
    offset: tuple[int, int] = (0, 0)
    weakest: float = 0.0  # the smallest |z| of any bit: a bit near 0 may have read either way

    @property
    def hex(self) -> str:
        return self.payload.hex()

    @property
    def confident(self) -> bool:
        """The mark read as a whole (``confidence``) and no bit left to chance (``weakest``): a picture whose own
        texture buries one bit reads as no mark rather than as a wrong identifier."""
        return self.confidence >= THRESHOLD and self.weakest >= WEAKEST_Z

    @property
    def is_adforge(self) -> bool:
        """An adforge asset identifier: the magic byte, read with confidence."""
        return self.confident and self.payload[0] == MAGIC


def _folded(image: Image.Image) -> tuple[np.ndarray, int]:
    """The clipped luma residual folded onto one tile (TILE_PX x TILE_PX), and how many cells it gathered."""
    y = _luma(np.asarray(image.convert("RGB"), dtype=np.float64))
    r = np.clip(y - cv2.GaussianBlur(y, (0, 0), HIGHPASS), -CLIP, CLIP)
    h, w = r.shape
    ph, pw = -(-h // TILE_PX) * TILE_PX, -(-w // TILE_PX) * TILE_PX
    r = np.pad(r, ((0, ph - h), (0, pw - w)))
    folded = r.reshape(ph // TILE_PX, TILE_PX, pw // TILE_PX, TILE_PX).sum(axis=(0, 2))
    return folded, (h // CELL) * (w // CELL)


def _decode(folded: np.ndarray, cells: int, offset: tuple[int, int]) -> Reading:
    """The reading of a folded residual whose tile starts ``offset`` (dx, dy) pixels into it."""
    dx, dy = offset
    f = np.roll(folded, (-dy, -dx), axis=(0, 1))
    g = f.reshape(TILE, CELL, TILE, CELL).sum(axis=(1, 3))
    bit, sign = _layout()
    corr = np.bincount(bit.ravel(), weights=(sign * g).ravel(), minlength=PAYLOAD_BITS)
    energy = np.bincount(bit.ravel(), weights=(g * g).ravel(), minlength=PAYLOAD_BITS)
    z = np.divide(corr, np.sqrt(energy), out=np.zeros(PAYLOAD_BITS), where=energy > 1e-12)
    confidence = float(np.mean(_erf(np.abs(z) / np.sqrt(2.0))))
    payload = np.packbits((corr > 0).astype(np.uint8)).tobytes()
    return Reading(payload, confidence, cells, offset, float(np.abs(z).min()))


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf

    return np.vectorize(erf, otypes=[np.float64])(x)


def read(image: Image.Image) -> Reading | None:
    """The 64-bit payload of ``image`` read at the tile grid of its top-left corner; None when the picture is too
    small to carry a mark (see :func:`can_carry`)."""
    if not can_carry(image.width, image.height):
        return None
    folded, cells = _folded(image)
    return _decode(folded, cells, (0, 0))


@lru_cache(maxsize=1)
def _bit_spectra() -> np.ndarray:
    """Each bit's (unsmoothed, sign-carrying) cell pattern over one tile, as conjugate 2-D real FFTs."""
    bit, sign = _layout()
    px_bit = np.repeat(np.repeat(bit, CELL, axis=0), CELL, axis=1)
    px_sign = np.repeat(np.repeat(sign, CELL, axis=0), CELL, axis=1)
    patterns = np.stack([np.where(px_bit == b, px_sign, 0.0) for b in range(PAYLOAD_BITS)])
    return np.conj(np.fft.rfft2(patterns))


def search(image: Image.Image) -> Reading | None:
    """The payload of a picture cropped from a marked one: the tile offset that correlates best with the bits'
    patterns, found by FFT over one folded tile, then read there. None when the picture is too small."""
    if not can_carry(image.width, image.height):
        return None
    folded, cells = _folded(image)
    corr = np.fft.irfft2(np.fft.rfft2(folded)[None] * _bit_spectra(), s=folded.shape)  # (bits, dy, dx)
    score = np.abs(corr).sum(axis=0)
    dy, dx = np.unravel_index(int(np.argmax(score)), score.shape)
    return _decode(folded, cells, (int(dx), int(dy)))

"""A reader of other tools' invisible watermarks: the ``dwtDct`` scheme of the ``invisible-watermark`` package
(import ``imwatermark``), which Stable Diffusion's reference scripts and SDXL pipelines put in their pictures.

Known marks (see :data:`FOREIGN_MARKS`): the Stable Diffusion v1 reference scripts embed the bytes
``b"StableDiffusionV1"`` (136 bits), SDXL (Stability's scripts and diffusers) the 48 bits 0xB3EC907BB19E; both
through ``WatermarkEncoder().encode(bgr, "dwtDct")`` on the picture in BGR order.

The decoder, as the package's (``WatermarkDecoder(...).decode(bgr, 'dwtDct')``) to the block vote:

* the picture as 8-bit BGR, converted to YUV (OpenCV's ``COLOR_BGR2YUV``), cropped to a multiple of 4 pixels;
  only the U channel carries the mark;
* one level of the Haar wavelet transform; its approximation band (one value per 2x2 pixels) is cut into 4x4
  blocks, visited row by row; block ``n`` carries bit ``n % nbits``;
* in each block the coefficient of largest magnitude other than the block's first one is the carrier; it reads
  ``|c| % 36 > 18`` as a 1; each bit is the majority of its blocks.

adforge's own mark is a different one (:mod:`storage.watermark`): this module only reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

__all__ = ["FOREIGN_MARKS", "MATCH", "ForeignMark", "block_votes", "foreign_marks", "read_bits"]

SCALE = 36.0  # the package's quantisation step for the U channel
BLOCK = 4  # coefficients per block side in the approximation band (8x8 pixels)
# The share of a known mark's bits that must read right for it to count: an unrelated picture agrees on about
# half (a flat one reads all zeros: 50 % of "StableDiffusionV1", 44 % of the SDXL bits); 90 % of 136 bits by
# chance is about 1e-21, of 48 bits 2e-9.
MATCH = 0.9


def _bits(data: bytes) -> tuple[int, ...]:
    return tuple(int(b) for b in np.unpackbits(np.frombuffer(data, dtype=np.uint8)))


FOREIGN_MARKS: dict[str, tuple[int, ...]] = {
    "Stable Diffusion v1 reference watermark": _bits(b"StableDiffusionV1"),
    "SDXL watermark": tuple(int(c) for c in bin(0xB3EC907BB19E)[2:]),
}


@dataclass(frozen=True)
class ForeignMark:
    name: str
    bit_accuracy: float  # the share of the mark's bits read right


_H = 0.7071067811865476  # the Haar filter tap, 1 / sqrt(2)


def _approximation(u: np.ndarray) -> np.ndarray:
    """The Haar approximation band, computed in the order PyWavelets' ``dwt2`` does (down the columns first, each
    pair weighted by 1/sqrt(2)), so the floating-point result is the same to the last bit: many values sit exactly
    on the decision boundary (k * 36 + 18) or tie for the largest, and a last-bit difference would flip votes."""
    a, b, c, d = u[0::2, 0::2], u[0::2, 1::2], u[1::2, 0::2], u[1::2, 1::2]
    return (a * _H + c * _H) * _H + (b * _H + d * _H) * _H


def block_votes(bgr: np.ndarray) -> np.ndarray:
    """Each 8x8 block's vote (1.0 or 0.0) in reading order, as the package's decoder casts it."""
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit BGR picture, got shape {bgr.shape} {bgr.dtype}")
    rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    u = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)[:rows, :cols, 1].astype(np.float64)
    ca = _approximation(u)
    nr, nc = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    blocks = ca[:nr * BLOCK, :nc * BLOCK].reshape(nr, BLOCK, nc, BLOCK).transpose(0, 2, 1, 3).reshape(nr * nc, -1)
    pos = np.argmax(np.abs(blocks[:, 1:]), axis=-1) + 1
    carrier = np.take_along_axis(blocks, pos[:, None], axis=-1)[:, 0]
    return (np.abs(carrier) % SCALE > 0.5 * SCALE).astype(np.float64)


def read_bits(bgr: np.ndarray, nbits: int) -> np.ndarray | None:
    """The ``nbits`` bits the package's decoder reads (0/1 array); None when the picture has fewer blocks."""
    votes = block_votes(bgr)
    if votes.size < nbits:
        return None
    index = np.arange(votes.size) % nbits
    share = np.bincount(index, weights=votes, minlength=nbits) / np.bincount(index, minlength=nbits)
    return (share * 255 > 127).astype(np.uint8)  # the package's rule (a tie reads as 1)


def foreign_marks(image: Image.Image) -> list[ForeignMark]:
    """The known dwtDct marks found in ``image`` (at least MATCH of their bits read right)."""
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])
    found = []
    for name, want in FOREIGN_MARKS.items():
        got = read_bits(bgr, len(want))
        if got is None:
            continue
        accuracy = float(np.mean(got == np.array(want, dtype=np.uint8)))
        if accuracy >= MATCH:
            found.append(ForeignMark(name, accuracy))
    return found

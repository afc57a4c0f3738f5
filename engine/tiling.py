"""Tiled processing: run a function over overlapping tiles of a (B, C, H, W) tensor and blend the results.

Used by the model upscaler (pixels -> pixels x scale), the VAE (latents <-> pixels) and the hires fix's
img2img pass (the denoiser, latent -> latent, at every sampling step). Each tile is processed on its own, so
peak memory follows the tile size, not the image size; only the output (and one weight plane) is full size.

Blending: where tiles overlap, each tile's output is weighted by a linear ramp across the overlap (rising from
its inner edge), and the sum is divided by the summed weights. Two neighbours' ramps add up to one, so the
seam fades from one tile into the other instead of jumping; image borders get no ramp. The tile grid depends
only on the sizes, never on the data, so the same input gives the same output bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

__all__ = ["AUTO_TILE_PIXELS", "Region", "TilePlan", "balanced_tile", "plan_tiles", "resolve_tile", "run_tiled", "tile_starts"]

# A step whose output has more pixels than this is tiled unless its ``tile`` argument says otherwise: about where
# the untiled SD VAE decoder and a 64-filter ESRGAN pass 2-4 GB of activations on the CPU.
AUTO_TILE_PIXELS = 1024 * 1024

Region = tuple[int, int, int, int]  # (top, bottom, left, right) in input coordinates, half-open


def resolve_tile(tile: int | None, out_pixels: int, default: int) -> int | None:
    """The tile size to use: ``tile`` 0 -> None (no tiling), a size -> that size, None -> ``default`` when the
    output has more than :data:`AUTO_TILE_PIXELS` pixels, else None."""
    if tile is None:
        return default if out_pixels > AUTO_TILE_PIXELS else None
    return tile or None


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, length)`` with at least ``overlap`` between neighbours,
    spread evenly, each a multiple of ``align`` (the last tile ends exactly at ``length`` when ``length`` is a
    multiple of ``align``). One tile if it already covers everything."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap ({overlap}) must be in [0, tile={tile})")
    n = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    starts = sorted({min(last, (round(i * last / (n - 1)) // align) * align) for i in range(n)})
    if starts[-1] != last and last % align == 0:
        starts.append(last)
    return starts


@dataclass(frozen=True)
class TilePlan:
    ys: list[int]
    xs: list[int]
    tile_h: int
    tile_w: int

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def regions(self) -> list[Region]:
        return [(y, y + self.tile_h, x, x + self.tile_w) for y in self.ys for x in self.xs]


def balanced_tile(length: int, tile: int, overlap: int, align: int = 1) -> int:
    """The smallest tile (a multiple of ``align``, at most ``tile``) that covers ``length`` with as few tiles as
    ``tile`` would: 1024 px in 512 px tiles with a 32 px overlap takes three tiles either way, but tiles of 368
    process 1.3x the pixels where tiles of 512 would process 2.25x (and need more memory)."""
    if tile >= length:
        return length
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)
    size = -(-size // align) * align
    return min(tile, max(size, overlap + align))


def plan_tiles(height: int, width: int, tile: int, overlap: int, align: int = 1, balance: bool = False) -> TilePlan:
    """The tile grid; ``balance`` shrinks the tiles to the smallest that need no more of them (see
    :func:`balanced_tile`): right for convolutional networks, not for the denoiser, whose tiles should keep the
    size the model was trained at."""
    if balance:
        tile_h, tile_w = balanced_tile(height, tile, overlap, align), balanced_tile(width, tile, overlap, align)
    else:
        tile_h, tile_w = min(tile, height), min(tile, width)
    return TilePlan(tile_starts(height, tile_h, overlap, align), tile_starts(width, tile_w, overlap, align), tile_h, tile_w)


def _ramp(start: int, size: int, starts: list[int]) -> torch.Tensor:
    """1-D weights of the tile at ``start`` (output coordinates): linear ramps over the overlaps with the tiles
    before and after it, flat 1 elsewhere (and at the image borders)."""
    w = torch.ones(size, dtype=torch.float32)
    index = starts.index(start)
    if index > 0:
        ov = starts[index - 1] + size - start  # overlap with the previous tile (all tiles have one size)
        if ov > 0:
            w[:ov] = torch.minimum(w[:ov], torch.arange(1, ov + 1, dtype=torch.float32) / (ov + 1))
    if index < len(starts) - 1:
        ov = start + size - starts[index + 1]
        if ov > 0:
            w[size - ov:] = torch.minimum(w[size - ov:], torch.arange(ov, 0, -1, dtype=torch.float32) / (ov + 1))
    return w


def run_tiled(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor, Region], torch.Tensor],
    *,
    tile: int,
    overlap: int,
    scale: Fraction | int = 1,
    out_channels: int | None = None,
    align: int = 1,
    out_device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    balance: bool = False,
) -> torch.Tensor:
    """``fn`` applied to ``x`` tile by tile and blended.

    ``fn(tile_tensor, region)`` gets a (B, C, th, tw) slice of ``x`` and its region (input coordinates, so it can
    slice auxiliary tensors alike) and returns (B, C', th * scale, tw * scale). ``scale`` may be a fraction
    (the VAE encoder's 1/8); tile starts are then multiples of ``align`` so that they map to whole output pixels.
    The output is float32 on ``out_device`` (default: ``x``'s device): keeping a huge output on the CPU bounds
    accelerator memory by the tile. ``progress(done, total)`` after each tile. ``balance``: see :func:`plan_tiles`.
    """
    b, c, h, w = x.shape
    scale = Fraction(scale)
    if (h * scale).denominator != 1 or (w * scale).denominator != 1:
        raise ValueError(f"size {w}x{h} times {scale} is not whole")
    plan = plan_tiles(h, w, tile, overlap, align, balance)
    oh, ow = int(h * scale), int(w * scale)
    th, tw = int(plan.tile_h * scale), int(plan.tile_w * scale)
    oys, oxs = [int(y * scale) for y in plan.ys], [int(v * scale) for v in plan.xs]
    device = torch.device(out_device) if out_device is not None else x.device
    out: torch.Tensor | None = None
    weight = torch.zeros(1, 1, oh, ow, dtype=torch.float32, device=device)
    wy = {oy: _ramp(oy, th, oys) for oy in oys}
    wx = {ox: _ramp(ox, tw, oxs) for ox in oxs}
    total, done = plan.count, 0
    for y, oy in zip(plan.ys, oys):
        for xs, ox in zip(plan.xs, oxs):
            region = (y, y + plan.tile_h, xs, xs + plan.tile_w)
            result = fn(x[:, :, region[0]:region[1], region[2]:region[3]], region)
            if result.shape[-2:] != (th, tw):
                raise ValueError(f"tile function returned {tuple(result.shape[-2:])}, expected {(th, tw)} for scale {scale}")
            if out is None:
                out = torch.zeros(b, out_channels or result.shape[1], oh, ow, dtype=torch.float32, device=device)
            mask = (wy[oy][:, None] * wx[ox][None, :]).to(device)
            out[:, :, oy:oy + th, ox:ox + tw] += result.to(device=device, dtype=torch.float32) * mask
            weight[:, :, oy:oy + th, ox:ox + tw] += mask
            del result
            done += 1
            if progress is not None:
                progress(done, total)
    assert out is not None
    return out.div_(weight)

"""What one generation request may ask for: its seeds and its size, and whether one image of that size can fit
the device at all. Checked before anything is allocated, so an impossible request is refused in milliseconds with
the parameter to blame, instead of failing on an 80 GB allocation after minutes of work.

The memory check is a floor, never an estimate of the peak: it counts only what one image must hold at once (the
VAE decoder's full-resolution activations; a tiled pass holds its whole picture in float32), so a request it refuses
could not have succeeded. Everything above the floor is left to the pipeline's out-of-memory halving.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.loading import LoadedModels

__all__ = ["MAX_SIDE", "MAX_UNTILED_PIXELS", "SEED_MAX", "DeviceBudget", "RequestError", "available_memory",
           "check_seeds", "check_size", "human_bytes", "size_problem"]

# Seeds are what torch's CPU generator and the database's signed 64-bit column both hold: 0 .. 2**63 - 1. Image i of
# a request for n images gets seed + i, so seed + n - 1 must stay in range: nothing wraps silently.
SEED_MAX = 2**63 - 1
# A side past this is a typo: A1111's 2048 px sliders times its 4x hires fix. Tiled passes go up to it.
MAX_SIDE = 8192
# An untiled render attends over the whole latent and decodes it in one piece; past 4096 x 4096 that needs tens of GB.
MAX_UNTILED_PIXELS = 4096 * 4096
_SQUARE = math.isqrt(MAX_UNTILED_PIXELS)
# One float32 RGB picture of the whole image: what even a tiled pass keeps (the decoded image it blends into).
_TILED_BYTES_PER_PIXEL = 3 * 4


class RequestError(ValueError):
    """A request parameter out of range; ``params`` are the request fields to blame (the CLI names its options)."""

    def __init__(self, params: str | tuple[str, ...], message: str):
        self.params = (params,) if isinstance(params, str) else tuple(params)
        super().__init__(message)


def check_seeds(seed: object, n: int = 1) -> None:
    """``seed`` .. ``seed + n - 1`` must all be seeds."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        # str() of a huge int raises past 4300 digits (and is no use to read): its size says enough.
        shown = repr(seed) if not isinstance(seed, int) or seed.bit_length() < 200 else f"a {seed.bit_length()}-bit number"
        raise RequestError("seed", f"seed must be an integer in [0, 2**63 - 1 = {SEED_MAX}], got {shown}")
    if not isinstance(n, int) or n < 1:
        raise RequestError("n", f"the number of images must be at least 1, got {n!r}")
    if seed + n - 1 > SEED_MAX:
        raise RequestError(("seed", "n"), f"{n} images from seed {seed} need seeds up to {seed + n - 1}, past the "
                                          f"largest seed {SEED_MAX} (2**63 - 1); start at {SEED_MAX - n + 1} or lower")


def size_problem(width: object, height: object, *, tiled: bool) -> tuple[str, str] | None:
    """(parameter, why) if ``width`` x ``height`` cannot be rendered, else None. ``tiled``: the pass runs in tiles."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
            return name, f"{name} must be a positive multiple of 8, got {value!r}"
        if value > MAX_SIDE:
            return name, f"{name} {value} is over the {MAX_SIDE} px limit of a side"
    assert isinstance(width, int) and isinstance(height, int)
    if not tiled and width * height > MAX_UNTILED_PIXELS:
        return "width", (f"{width}x{height} is {width * height:,} px, over the {MAX_UNTILED_PIXELS:,} ({_SQUARE}x{_SQUARE}) an "
                         "untiled render may have; render smaller and upscale, or tile the pass")
    return None


def check_size(width: object, height: object, *, tiled: bool) -> None:
    problem = size_problem(width, height, tiled=tiled)
    if problem:
        raise RequestError(*problem)


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _cgroup_headroom() -> int | None:
    """Bytes the process's cgroup (v2) may still take, if it has a limit: containers cap below the host's RAM."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on ``device``; None where that cannot be asked cheaply."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return None
        # Blocks torch's caching allocator holds but no tensor uses are free to us too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024  # counts reclaimable page cache, unlike SC_AVPHYS_PAGES
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    cgroup = _cgroup_headroom()
    return found if cgroup is None else min(found, cgroup)


@dataclass(frozen=True)
class DeviceBudget:
    """What one image needs at the least on a loaded model's device, checked against what the device has free."""

    device: torch.device
    decoder_channels: int = 128  # the VAE decoder's full-resolution stage (128 in every SD VAE)
    element_size: int = 2  # bytes per activation in the VAE's dtype

    @classmethod
    def for_models(cls, models: "LoadedModels") -> "DeviceBudget":
        vae = models.vae
        return cls(models.device, vae.config.ch * vae.config.ch_mult[0], vae.dtype.itemsize)

    def floor_bytes(self, width: int, height: int, *, tiled: bool) -> int:
        """Bytes one image of this size must hold at once: two full-resolution decoder activations (a layer's input
        and output) untiled, one float32 picture of the whole image tiled."""
        if tiled:
            return width * height * _TILED_BYTES_PER_PIXEL
        return width * height * 2 * self.decoder_channels * self.element_size

    def check(self, width: int, height: int, *, tiled: bool) -> None:
        need = self.floor_bytes(width, height, tiled=tiled)
        have = available_memory(self.device)
        if have is not None and need > have:
            raise RequestError(("width", "height"), (
                f"{width}x{height} needs at least {human_bytes(need)} for one image on {self.device} "
                f"({'tiled' if tiled else 'untiled'}) but {human_bytes(have)} is free; render smaller and upscale"))

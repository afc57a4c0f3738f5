"""The hires fix (A1111's "Hires. fix"): render at the model's native size, upscale, re-render with img2img.

SD 1.x draws duplicated subjects and broken anatomy when asked for 1024 px directly; rendering the composition at
its native size first and then letting img2img add detail at the larger size avoids both. Steps:

1. the first pass (plain txt2img at the request's size) gives a latent and an image;
2. upscale by ``scale`` to a size whose sides are multiples of 8: in latent space (``latent``: bilinear, as A1111's
   "Latent"; ``latent-nearest``), or in pixel space (``lanczos``, or a super-resolution model) and then encoded;
3. img2img at that size with strength ``denoise`` over a ``steps``-step schedule (default: the first pass's
   steps; like every img2img it runs the last ``int(steps * denoise)`` of them), with the same seed, prompt,
   CFG and sampler.

Deterministic: the second pass's noise comes from a fresh generator seeded with the image's seed (drawn for
the whole latent, on the CPU, whatever the batch or the tiling), so the same seed gives the same image.
Above :data:`engine.tiling.AUTO_TILE_PIXELS` (or with ``tile=``) the second pass denoises and decodes
in feathered tiles, so a 4096 x 4096 result needs the memory of a tile, not of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from engine.pipeline import GenerationRequest, GenerationResult, ProgressFn
from engine.upscale.chain import Hires, hires_size
from engine.upscale.networks import ModelUpscaler

__all__ = ["Generator", "hires_fix", "hires_parameters", "hires_requests"]

SD_VAE_FACTOR = 8


class Generator(Protocol):
    """What the hires fix needs of a pipeline: :meth:`engine.pipeline.Pipeline.generate` (or a wrapper of it,
    such as the campaign flow's out-of-memory halving one)."""

    def generate(self, requests: Sequence[GenerationRequest], progress: ProgressFn | None = None) -> list[GenerationResult]: ...

_A1111_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}


def _fmt(value: float) -> str:
    return f"{value:g}"


def hires_parameters(fix: Hires, upscaler: ModelUpscaler | None = None) -> dict[str, str]:
    """The infotext fields A1111 writes for a hires fix."""
    p = {"Denoising strength": _fmt(fix.denoise), "Hires upscale": _fmt(fix.scale)}
    if fix.steps is not None:
        p["Hires steps"] = str(fix.steps)
    p["Hires upscaler"] = upscaler.info.name if upscaler is not None else _A1111_NAMES[fix.upscaler]
    return p


def _upscale_latent(latent: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, h, w) -> (C, H, W); ``size`` is (H, W)."""
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(latent[None].float(), size=size, mode=mode, **kw)[0]


def _upscale_pixels(image: Image.Image, size: tuple[int, int], fix: Hires, upscaler: ModelUpscaler | None) -> Image.Image:
    """Pixel-space upscale to exactly ``size`` (W, H): the model (at its own scale, repeated while it is short of
    the target) then Lanczos to the exact size, or Lanczos alone."""
    if fix.model_file is not None:
        if upscaler is None:
            raise ValueError(f"hires upscaler {fix.model_file!r} needs its loaded model")
        while image.width < size[0] or image.height < size[1]:
            image = upscaler.upscale(image)
            if upscaler.scale <= 1:
                break
    return image if image.size == size else image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def hires_requests(first: Sequence[GenerationResult], fix: Hires, upscaler: ModelUpscaler | None = None) -> list[GenerationRequest]:
    """The second pass's img2img requests for the first pass's results."""
    out = []
    for res in first:
        r = res.request
        # The VAE's factor, as the first pass's latent shows it (SD's 8 if the result carries none).
        factor = r.width // res.latents.shape[-1] if res.latents is not None else SD_VAE_FACTOR
        w, h = hires_size(r.width, r.height, fix.scale, factor)
        # The second pass is the base model's img2img: a refiner finished the first pass and is not asked again.
        common = dict(width=w, height=h, steps=fix.steps or r.steps, strength=fix.denoise, mask=None, tile=fix.tile,
                      refiner_switch=None)
        if fix.latent:
            if res.latents is None:
                raise ValueError("a latent hires fix needs the first pass's latents")
            mode = "nearest" if fix.upscaler == "latent-nearest" else "bilinear"
            latent = _upscale_latent(res.latents, (h // factor, w // factor), mode)
            second = replace(r, init_image=None, init_latent=latent, **common)
        else:
            image = _upscale_pixels(res.image, (w, h), fix, upscaler)
            second = replace(r, init_image=image, init_latent=None, **common)
        if second.tiled and second.controls:
            # The first pass laid the composition out; a tiled second pass only refines it, and ControlNets do not
            # run on tiles, so it goes without them rather than fail.
            second = replace(second, controls=())
        out.append(second)
    return out


def hires_fix(pipe: Generator, first: Sequence[GenerationResult], fix: Hires, *, upscaler: ModelUpscaler | None = None,
              progress: ProgressFn | None = None) -> list[GenerationResult]:
    """Second passes for ``first`` (results of ``pipe.generate``), in order. Each result keeps its first-pass
    request (``Size`` in its parameters stays the first pass's, as in A1111) and gains the hires fields."""
    if fix.model_file is not None and upscaler is None:
        raise ValueError(f"hires upscaler {fix.model_file!r} needs its loaded model")
    second = pipe.generate(hires_requests(first, fix, upscaler), progress=progress)
    extra = hires_parameters(fix, upscaler if fix.model_file is not None else None)
    return [
        GenerationResult(request=a.request, image=b.image, parameters={**a.parameters, **extra}, latents=b.latents)
        for a, b in zip(first, second)
    ]

"""Applying a parsed chain: the hires fix on rendered batches, then the pixel steps image by image.

The two halves are separate on purpose: the hires fix re-renders (it needs the pipeline and runs as a batch),
while ``model`` / ``lanczos`` / ``fit`` only need the image, so a caller can fail one image's pixel steps
without losing the others (the campaign flow records such a failure against that variant only).

Model files are found through a *resolver* ``(file, sha256) -> ModelUpscaler``; the default loads the file as
named (relative to the current directory) through the per-process cache of :func:`load_upscaler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from engine.image_ops import cover_fit
from engine.pipeline import GenerationRequest, GenerationResult, Pipeline, ProgressFn
from engine.upscale.chain import Chain, Fit, Hires, Lanczos, ModelStep, Step
from engine.upscale.hires import Generator, hires_fix
from engine.upscale.networks import ModelUpscaler, lanczos, load_upscaler

__all__ = ["UpscalerResolver", "apply_hires", "apply_pixel_steps", "chain_parameters", "file_resolver", "run_chain"]

UpscalerResolver = Callable[[str, "str | None"], ModelUpscaler]


def file_resolver(device: str | torch.device = "cpu") -> UpscalerResolver:
    """Resolve a chain's model file by its path as written."""
    return lambda file, sha256: load_upscaler(file, sha256=sha256, device=device)


def hires_upscaler(fix: Hires, resolve: UpscalerResolver) -> ModelUpscaler | None:
    return resolve(fix.model_file, fix.sha256) if fix.model_file is not None else None


def apply_hires(pipe: Generator, first: Sequence[GenerationResult], fix: Hires, resolve: UpscalerResolver,
                progress: ProgressFn | None = None) -> list[GenerationResult]:
    return hires_fix(pipe, first, fix, upscaler=hires_upscaler(fix, resolve), progress=progress)


def apply_pixel_steps(image: Image.Image, steps: Sequence[Step], resolve: UpscalerResolver,
                      progress: ProgressFn | None = None) -> Image.Image:
    """``steps`` (no hires) applied to ``image`` in order; ``progress(done, total)`` per model tile."""
    for step in steps:
        if isinstance(step, ModelStep):
            image = resolve(step.file, step.sha256).upscale(image, tile=step.tile, overlap=step.overlap, progress=progress)
        elif isinstance(step, Lanczos):
            image = lanczos(image, step.scale)
        elif isinstance(step, Fit):
            image = cover_fit(image.convert("RGB"), step.width, step.height)
        else:
            raise ValueError(f"{step.canonical()} is not a pixel step (the hires fix runs with the pipeline)")
    return image


def chain_parameters(chain: Chain, resolve: UpscalerResolver) -> dict[str, str]:
    """Infotext fields for the non-hires part of a chain (the hires fields come with :func:`hires_fix`):
    ``Upscaler`` lists every model file of the chain as ``name (hash)``, and ``Postprocess`` is the chain."""
    p: dict[str, str] = {}
    used = [resolve(file, getattr(chain.steps[i], "sha256", None)) for i, file in chain.model_files()]
    if used:
        p["Upscaler"] = ", ".join(f"{u.info.name} ({u.info.short_hash})" for u in used)
    p["Postprocess"] = chain.canonical(pins=False)
    return p


def run_chain(pipe: Pipeline, requests: Sequence[GenerationRequest], chain: Chain, *,
              resolve: UpscalerResolver | None = None, progress: ProgressFn | None = None) -> list[GenerationResult]:
    """Render ``requests`` and take every image through ``chain``: the engine-only way to use upscaling
    (the campaign flow calls the halves itself to record failures per image)."""
    resolve = resolve or file_resolver(pipe.device)
    results = pipe.generate(requests, progress=progress)
    if chain.hires is not None:
        results = apply_hires(pipe, results, chain.hires, resolve, progress)
    extra = chain_parameters(chain, resolve)
    out = []
    for res in results:
        image = apply_pixel_steps(res.image, chain.pixel_steps, resolve)
        out.append(GenerationResult(request=res.request, image=image, parameters={**res.parameters, **extra}, latents=res.latents))
    return out

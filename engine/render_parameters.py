"""A rendered image's generation settings as A1111 writes them in its infotext ("Steps", "Sampler", "CFG scale",
"Seed", ... in that order), from the request and the models that drew it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.adapters.infotext import adapter_parameters
from engine.control_steps import ControlNetCache
from engine.loading import LoadedModels
from engine.requests import GenerationRequest
from engine.sampler_names import SamplerSpec

if TYPE_CHECKING:
    from engine.pipeline import Pipeline

__all__ = ["render_parameters"]


def _fmt(value: float) -> str:
    return f"{value:g}"


def render_parameters(m: LoadedModels, r: GenerationRequest, sampler: SamplerSpec, refiner: Pipeline | None,
                      controlnets: ControlNetCache) -> dict[str, str]:
    """``refiner``: the pipeline that finishes requests with a refiner switch, if one is attached."""
    p = {
        "Steps": str(r.steps),
        "Sampler": sampler.name,
        "CFG scale": _fmt(r.cfg_scale),
        "Seed": str(r.seed),
        "Size": f"{r.width}x{r.height}",
        "Model hash": m.checkpoint.short_hash,
        "Model": m.checkpoint.name,
    }
    if m.vae_file is not None:
        p["VAE hash"] = m.vae_file.short_hash
        p["VAE"] = m.vae_file.name
    if r.has_init:
        p["Denoising strength"] = _fmt(r.strength)
    if r.mask is not None:
        p["Mask blur"] = str(r.mask_blur)
    if r.clip_skip != 1:
        p["Clip skip"] = str(r.clip_skip)
    if r.refiner_switch is not None and refiner is not None:
        p["Refiner"] = f"{refiner.models.checkpoint.name} [{refiner.models.checkpoint.short_hash}]"
        p["Refiner switch at"] = _fmt(r.refiner_switch)
        if r.refiner_loras:  # no prompt tag carries them, so the infotext names them with their strengths
            p["Refiner loras"] = ", ".join(f"{u.file.name}: {_fmt(u.te)}" + ("" if u.te == u.unet else f":{_fmt(u.unet)}")
                                           for u in r.refiner_loras)
    if m.prediction != "eps" or m.family.name.startswith("sd2"):
        p["Prediction"] = m.prediction  # SD 2.x files do not say which they are: the choice made is recorded
    p.update(adapter_parameters(r.loras + r.refiner_loras, r.embeddings, m.checkpoint.short_hash))
    p.update(controlnets.parameters(r.controls))
    if r.fast.enabled:
        p["Fast"] = str(r.fast)
    return p

"""Samplers in k-diffusion form: the model is seen as a denoiser D(x, sigma) ~ E[x0 | x], where
x = x0 + sigma * noise, and each sampler walks x down a given sigma sequence.

Names are A1111's display names, since those are what users type and what the PNG infotext
("Sampler: DPM++ 2M Karras") records. The formulas follow DESIGN.md "Samplers".

Everything runs in float32. The per-step scalars (sigma ratios, expm1(-h), ...) are computed as
Python floats (double) from the float32 sigmas: that keeps them exact-ish and avoids a device
sync per step when x lives on a GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedule import DiscreteSchedule

__all__ = [
    "Denoiser",
    "SamplerSpec",
    "SAMPLERS",
    "get_sampler",
    "sampler_sigmas",
    "sample",
]

# D(x (B,C,H,W), sigma (B,)) -> estimate of the clean latent, same shape as x.
Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111 display name, exactly as A1111 writes it into infotext
    method: str  # "euler" | "euler_ancestral" | "dpmpp_2m" | "ddim"
    schedule: str  # "default" | "karras" | "ddim"
    ancestral: bool  # needs fresh noise per step


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("Euler", "euler", "default", False),
        SamplerSpec("Euler a", "euler_ancestral", "default", True),
        SamplerSpec("DPM++ 2M", "dpmpp_2m", "default", False),
        SamplerSpec("DPM++ 2M Karras", "dpmpp_2m", "karras", False),
        SamplerSpec("DDIM", "ddim", "ddim", False),
    )
}

_METHODS = frozenset({"euler", "euler_ancestral", "dpmpp_2m", "ddim"})


def _fold(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp_2m_karras", "dpm++-2m karras" all fold to "dpmpp2mkarras".
    return re.sub(r"[\s_\-]+", "", name.strip().lower().replace("++", "pp"))


_LOOKUP: dict[str, str] = {_fold(n): n for n in SAMPLERS}
# Spelled-out alias that does not fold onto a display name.
_LOOKUP["eulerancestral"] = "Euler a"


def _lookup_key(name: str) -> str:
    key = _fold(name)
    # k-diffusion / older A1111 API names carry a "k_" prefix ("k_euler_a", "k_dpmpp_2m").
    if key not in _LOOKUP and key.startswith("k") and key[1:] in _LOOKUP:
        key = key[1:]
    return key


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by A1111 display name, case-insensitively, or by a simple alias
    ("euler_a", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "k_euler", "ddim")."""
    if not isinstance(name, str):
        raise ValueError(f"sampler name must be a string, got {name!r}")
    key = _lookup_key(name)
    if key not in _LOOKUP:
        valid = ", ".join(repr(n) for n in SAMPLERS)
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {valid}")
    return SAMPLERS[_LOOKUP[key]]


def sampler_sigmas(spec: SamplerSpec, schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """The float32 sigma sequence (steps+1 entries) the sampler walks for `steps` model calls."""
    if spec.schedule == "default":
        return schedule.default_sigmas(steps)
    if spec.schedule == "karras":
        return schedule.karras_sigmas(steps)
    if spec.schedule == "ddim":
        return schedule.ddim_sigmas(steps)
    raise ValueError(f"unknown schedule {spec.schedule!r} in sampler {spec.name!r}")


def _check_sigmas(sigmas: Tensor) -> list[float]:
    s = torch.as_tensor(sigmas).detach()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries (1 step), got shape {tuple(s.shape)}")
    # Python floats of the float32 values: the scalars below are exact functions of what we were given.
    vals = [float(v) for v in s.to(device="cpu", dtype=torch.float32)]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("sigmas must be finite")
    # Every sigma a step starts from divides d = (x - D)/sigma; only the final one may be 0.
    if any(v <= 0 for v in vals[:-1]) or vals[-1] < 0:
        raise ValueError("sigmas must be > 0 except the last, which may be 0")
    return vals


def sample(
    spec: SamplerSpec,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_fn: Callable[[int], Tensor] | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Run `spec`'s sampler over `sigmas` (len(sigmas)-1 steps, one denoiser call each).

    x must already be the noisy latent at sigmas[0] (k-diffusion scale: x0 + sigmas[0] * noise).
    sigmas may be any tail slice of a full schedule (img2img); multistep state starts afresh,
    so DPM++ 2M's first step is the first step of the slice. The last sigma may be > 0 (DDIM ends
    at the t=0 training sigma): the result is then the latent at that noise level, in k-diffusion
    scale.

    noise_fn(i) returns standard normal noise shaped like x for step i; it is required by
    ancestral samplers and called only for steps that add noise (sigma_next > 0), in step order.
    callback(i, total) is called after step i (0-based) completes; total = len(sigmas) - 1.
    """
    if spec.method not in _METHODS:
        raise ValueError(f"unknown sampler method {spec.method!r} in sampler {spec.name!r}")
    if spec.ancestral and noise_fn is None:
        raise ValueError(f"sampler {spec.name!r} is ancestral and needs noise_fn (step index -> noise like x)")
    sig = _check_sigmas(sigmas)
    total = len(sig) - 1
    x = x.to(torch.float32)
    batch = x.shape[0]

    def denoise(s: float) -> Tensor:
        sigma_vec = torch.full((batch,), s, dtype=torch.float32, device=x.device)
        out = denoiser(x, sigma_vec)
        if out.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        return out.to(torch.float32)

    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(total):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(s)

        if spec.method in ("euler", "ddim"):
            # DDIM with eta=0 is exactly this Euler step in sigma space (see DiscreteSchedule.ddim_sigmas).
            d = (x - denoised) / s
            x = x + d * (s_next - s)

        elif spec.method == "euler_ancestral":
            # Split the step into a deterministic move to sigma_down and fresh noise of sigma_up, with
            # sigma_down^2 + sigma_up^2 = sigma_next^2 so the marginal noise level is right.
            sigma_up = min(s_next, math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
            sigma_down = math.sqrt(max(s_next**2 - sigma_up**2, 0.0))
            d = (x - denoised) / s
            x = x + d * (sigma_down - s)
            if s_next > 0:
                assert noise_fn is not None  # checked above
                noise = noise_fn(i)
                if tuple(noise.shape) != tuple(x.shape):
                    raise ValueError(f"noise_fn({i}) returned shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
                x = x + noise.to(device=x.device, dtype=torch.float32) * sigma_up

        else:  # dpmpp_2m
            if s_next == 0:
                # h = inf: the exponential integrator's update degenerates to x = D (k-diffusion's
                # sigma_next = 0 branch); written out to avoid inf * 0.
                x = denoised
            else:
                # t = -log(sigma) is half-log-SNR; the solver is exact for D constant over the step.
                h = math.log(s) - math.log(s_next)
                if old_denoised is None:
                    d_eff = denoised
                else:
                    # Second order: extrapolate D linearly in t from the previous step's estimate.
                    r = h_last / h
                    d_eff = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * old_denoised
                x = (s_next / s) * x - math.expm1(-h) * d_eff
                h_last = h
            old_denoised = denoised

        if callback is not None:
            callback(i, total)
    return x

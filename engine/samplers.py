"""Samplers in k-diffusion form: the model is seen as a denoiser D(x, sigma) ~ E[x0 | x], where
x = x0 + sigma * noise, and each sampler walks x down a given sigma sequence.

One function per sampler, the step written out as the maths (DESIGN.md "Samplers"); a registry maps
A1111's display names, since those are what users type and what the PNG infotext ("Sampler: DPM++ 2M
Karras") records, to a function and a sigma schedule. A name is resolved once, when a request is
validated; :func:`sample` then calls the resolved function, and no step looks at a name.

Everything runs in float32. The per-step scalars (sigma ratios, expm1(-h), ...) are computed as
Python floats (double) from the float32 sigmas: that keeps them exact-ish and avoids a device
sync per step when x lives on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .sampler_names import SAMPLERS, SamplerSpec, get_sampler
from .schedule import DiscreteSchedule

__all__ = [
    "Denoiser",
    "SamplerSpec",
    "SAMPLERS",
    "ddim",
    "dpmpp_2m",
    "euler",
    "euler_ancestral",
    "get_sampler",
    "lcm",
    "sampler_sigmas",
    "sample",
]

# D(x (B,C,H,W), sigma (B,)) -> estimate of the clean latent, same shape as x.
Denoiser = Callable[[Tensor, Tensor], Tensor]
# What a sampler function calls: D at one sigma for the whole batch, checked and in float32.
Model = Callable[[Tensor, float], Tensor]
NoiseFn = Callable[[int], Tensor]  # step index -> standard normal noise like x, on x's device
StepDone = Callable[[int], None]


# ---- the samplers: sigmas are Python floats, all > 0 but the last, which may be 0 ------------------------------


def euler(model: Model, x: Tensor, sigmas: list[float], noise: NoiseFn | None, step_done: StepDone) -> Tensor:
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = model(x, s)
        d = (x - denoised) / s
        x = x + d * (s_next - s)
        step_done(i)
    return x


def ddim(model: Model, x: Tensor, sigmas: list[float], noise: NoiseFn | None, step_done: StepDone) -> Tensor:
    # DDIM with eta=0 is exactly an Euler step in sigma space; what makes it DDIM is its schedule
    # (see DiscreteSchedule.ddim_sigmas).
    return euler(model, x, sigmas, noise, step_done)


def euler_ancestral(model: Model, x: Tensor, sigmas: list[float], noise: NoiseFn | None, step_done: StepDone) -> Tensor:
    assert noise is not None  # sample() refuses an ancestral sampler without noise
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = model(x, s)
        # Split the step into a deterministic move to sigma_down and fresh noise of sigma_up, with
        # sigma_down^2 + sigma_up^2 = sigma_next^2 so the marginal noise level is right.
        sigma_up = min(s_next, math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
        sigma_down = math.sqrt(max(s_next**2 - sigma_up**2, 0.0))
        d = (x - denoised) / s
        x = x + d * (sigma_down - s)
        if s_next > 0:
            x = x + noise(i) * sigma_up
        step_done(i)
    return x


def dpmpp_2m(model: Model, x: Tensor, sigmas: list[float], noise: NoiseFn | None, step_done: StepDone) -> Tensor:
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = model(x, s)
        if s_next == 0:
            # h = inf: the exponential integrator's update degenerates to x = D (k-diffusion's
            # sigma_next = 0 branch); written out to avoid inf * 0.
            x = denoised
        else:
            # t = -log(sigma) is half-log-SNR; the solver is exact for D constant over the step.
            h = math.log(s) - math.log(s_next)
            if old_denoised is None:
                d = denoised
            else:
                # Second order: extrapolate D linearly in t from the previous step's estimate.
                r = h_last / h
                d = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * old_denoised
            x = (s_next / s) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        step_done(i)
    return x


def lcm(model: Model, x: Tensor, sigmas: list[float], noise: NoiseFn | None, step_done: StepDone) -> Tensor:
    # Latent Consistency Model sampling (k-diffusion / A1111 / ComfyUI sample_lcm): a consistency model's
    # D(x, sigma) is already its one-jump estimate of x0, so each step takes it, then re-noises it to the
    # next sigma with fresh noise (none after the last step). In VP form this is diffusers' LCMScheduler
    # step: x_prev = sqrt(ac_prev) * denoised + sqrt(1 - ac_prev) * noise.
    #
    # LCM's "boundary condition" denoised = c_out(t) D + c_skip(t) x (sigma_data 0.5, c_skip =
    # 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25), diffusers' timestep_scaling 10) is
    # NOT applied, as in k-diffusion's and ComfyUI's "lcm" sampler (ComfyUI applies it only through its
    # ModelSamplingDiscrete "lcm" patch; A1111's "LCM" applies it, and quantises t to the 50-step grid,
    # inside its LCM denoiser). It is not learnt: on LCM's grid (t >= 19) c_skip <= 6.9e-6 and
    # 1 - c_out <= 3.5e-6, and at <= 8 steps (t >= 139) both are <= 1.3e-7, below the float16 the UNet
    # runs in. tests/engine/test_lcm_turbo.py measures the gap against diffusers.
    assert noise is not None  # sample() refuses an ancestral sampler without noise
    for i, s_next in enumerate(sigmas[1:]):
        x = model(x, sigmas[i])
        if s_next > 0:
            x = x + noise(i) * s_next
        step_done(i)
    return x


SamplerFn = Callable[[Model, Tensor, list[float], NoiseFn | None, StepDone], Tensor]
_FUNCTIONS: dict[str, SamplerFn] = {f.__name__: f for f in (euler, euler_ancestral, dpmpp_2m, ddim, lcm)}
_SCHEDULES: dict[str, Callable[[DiscreteSchedule, int], Tensor]] = {
    "default": lambda schedule, steps: schedule.default_sigmas(steps),
    "karras": lambda schedule, steps: schedule.karras_sigmas(steps),
    "ddim": lambda schedule, steps: schedule.ddim_sigmas(steps),
    "sgm_uniform": lambda schedule, steps: schedule.sgm_uniform_sigmas(steps),
    "turbo": lambda schedule, steps: schedule.turbo_sigmas(steps),
    "lcm": lambda schedule, steps: schedule.lcm_sigmas(steps),
}


# ---- the registry -----------------------------------------------------------------------------------------------


def sampler_function(spec: SamplerSpec) -> SamplerFn:
    try:
        return _FUNCTIONS[spec.method]
    except KeyError:
        raise ValueError(f"unknown sampler method {spec.method!r} in sampler {spec.name!r}") from None


def sampler_sigmas(spec: SamplerSpec, schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """The float32 sigma sequence (steps+1 entries) the sampler walks for `steps` model calls."""
    sigmas = _SCHEDULES.get(spec.schedule)
    if sigmas is None:
        raise ValueError(f"unknown schedule {spec.schedule!r} in sampler {spec.name!r}")
    return sigmas(schedule, steps)


# ---- running one ------------------------------------------------------------------------------------------------


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
    function = sampler_function(spec)
    if spec.ancestral and noise_fn is None:
        raise ValueError(f"sampler {spec.name!r} is ancestral and needs noise_fn (step index -> noise like x)")
    sig = _check_sigmas(sigmas)
    total = len(sig) - 1
    x = x.to(torch.float32)
    shape, device = tuple(x.shape), x.device

    def model(latent: Tensor, s: float) -> Tensor:
        out = denoiser(latent, torch.full((shape[0],), s, dtype=torch.float32, device=device))
        if tuple(out.shape) != shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected {shape}")
        return out.to(torch.float32)

    def noise(i: int) -> Tensor:
        assert noise_fn is not None
        n = noise_fn(i)
        if tuple(n.shape) != shape:
            raise ValueError(f"noise_fn({i}) returned shape {tuple(n.shape)}, expected {shape}")
        return n.to(device=device, dtype=torch.float32)

    def step_done(i: int) -> None:
        if callback is not None:
            callback(i, total)

    return function(model, x, sig, noise if noise_fn is not None else None, step_done)

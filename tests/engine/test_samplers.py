"""Samplers and the SD 1.x schedule, checked against diffusers' schedulers on a toy eps-model.

Both sides call the same deterministic eps(x_in, t). Ours sees it through the k-diffusion
denoiser D(x, sigma) = x - sigma * eps(x * c_in, t), c_in = 1/sqrt(sigma^2 + 1); diffusers runs its
standard pipeline loop (scale_model_input -> eps -> step).

Diffusers maps sigma <-> t differently from k-diffusion (EulerDiscrete interpolates sigma, not
log-sigma, linearly in t; DPMSolverMultistep rounds Karras timesteps to integers; its non-Karras
"linspace" timesteps are linspace(0, 999, n+1).round()[::-1][:-1], not k-diffusion's
linspace(999, 0, n)). So the trajectory parity tests feed our samplers diffusers' own sigmas and
give the model exactly the t diffusers gives it; our own sigma schedules are compared with
diffusers' sigmas separately, with tolerances derived below.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.samplers import SAMPLERS, SamplerSpec, get_sampler, sample, sampler_sigmas
from engine.schedule import DiscreteSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

# diffusers 0.42.1 + numpy 2 warn inside set_timesteps (np.array on a tensor); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD1_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# SD 1.x's own scheduler_config.json for DDIM: without clip_sample=False diffusers clamps x0 to [-1, 1].
SD1_DDIM_CONFIG = dict(
    SD1_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
)
SHAPE = (2, 4, 8, 8)

# Final-latent parity: both sides do the same float32 arithmetic in a slightly different order
# (we form scalars like expm1(-h) in double, diffusers in float32, and x is scaled by c_in on our
# side but already VP-scaled on diffusers'), so they agree to float32 rounding accumulated over the
# steps: measured 2e-7 .. 6e-7 of the latent's max-abs scale. 1e-5 leaves ~15x headroom and still
# separates real convention slips: DDIM's final sqrt(alphas_cumprod[0]) factor alone is 4.3e-4, a
# DPM++ 2M first order step in place of a second order one is ~1e-2.
PARITY_RTOL = 1e-5

# Our schedule is float64; diffusers builds betas and alphas_cumprod in float32. The cumulative
# product and the 1 - ac cancellation near t = 0 (1 - ac ~ 8.5e-4) leave its training sigmas ~1.3e-5
# relative off the float64 values (measured; eps32 / (1 - ac_0) / 2 ~ 3.5e-5 is the worst-case
# estimate). 5e-5 covers that with margin; a wrong beta formula misses by >= 1e-3.
FLOAT32_SCHEDULE_RTOL = 5e-5


# --------------------------------------------------------------------------- toy eps-model


def _make_eps():
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(4, 4, generator=g) * 0.5
    b = torch.randn(4, generator=g) * 0.1
    phase = torch.rand(4, generator=g) * 2 * math.pi

    def eps(x_in: torch.Tensor, t) -> torch.Tensor:
        """Deterministic, smooth, nonlinear in x, and t-dependent enough that a wrong t shows."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_in.shape[0])
        lin = torch.einsum("oc,bchw->bohw", w, x_in) + b.view(1, -1, 1, 1)
        tt = 0.2 * torch.sin(t.view(-1, 1, 1, 1) / 80.0 + phase.view(1, -1, 1, 1))
        return 0.8 * x_in + 0.3 * torch.tanh(lin) + tt

    return eps


EPS = _make_eps()


def make_denoiser(t_of_sigma):
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        c_in = 1.0 / torch.sqrt(s**2 + 1.0)
        return x - s * EPS(x * c_in, t_of_sigma(sigma))

    return denoiser


def lookup_t(sigmas: torch.Tensor, timesteps: torch.Tensor):
    """t_of_sigma giving the model exactly the timestep diffusers pairs with each sigma."""
    table = sigmas.to(torch.float64)
    ts = timesteps.to(torch.float32)

    def t_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
        idx = (sigma.to(torch.float64).view(-1, 1) - table.view(1, -1)).abs().argmin(dim=1)
        return ts[idx]

    return t_of_sigma


def noise_latents(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, latents: torch.Tensor, *, generator=None, begin: int = 0) -> torch.Tensor:
    """diffusers' standard denoising loop (as in StableDiffusionPipeline / Img2ImgPipeline)."""
    timesteps = scheduler.timesteps[begin:]
    if begin:
        scheduler.set_begin_index(begin)
    for t in timesteps:
        inp = scheduler.scale_model_input(latents, t)
        kwargs = {"generator": generator} if generator is not None else {}
        latents = scheduler.step(EPS(inp, t), t, latents, **kwargs).prev_sample
    return latents


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, rtol: float = PARITY_RTOL) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.fixture(scope="module")
def sched() -> DiscreteSchedule:
    return DiscreteSchedule.sd1()


# --------------------------------------------------------------------------- schedule


def test_sd1_sigma_range(sched):
    assert sched.sigma_min == pytest.approx(0.029167, abs=1e-4)
    assert sched.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert sched.sigmas.dtype == torch.float64 and sched.sigmas.shape == (1000,)
    assert sched.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(sched.log_sigmas, sched.sigmas.log())


def test_training_sigmas_match_diffusers(sched):
    ref = EulerDiscreteScheduler(**SD1_CONFIG).alphas_cumprod.double()
    assert torch.allclose(sched.alphas_cumprod, ref, rtol=FLOAT32_SCHEDULE_RTOL, atol=0)
    ref_sigmas = ((1 - ref) / ref).sqrt()
    assert torch.allclose(sched.sigmas, ref_sigmas, rtol=FLOAT32_SCHEDULE_RTOL, atol=0)


def test_sigma_t_round_trip(sched):
    # Training sigmas map to their integer timesteps.
    t = sched.sigma_to_t(sched.sigmas)
    assert torch.allclose(t, torch.arange(1000, dtype=torch.float64), atol=1e-9)
    # Fractional t -> sigma -> t is the identity (both are the same piecewise-linear map in log-sigma).
    tf = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    assert torch.allclose(sched.sigma_to_t(sched.t_to_sigma(tf)), tf, atol=1e-9)
    # log-sigma is linear in t within an interval: t = 10.5 sits at the geometric mean.
    mid = sched.t_to_sigma(torch.tensor([10.5], dtype=torch.float64))
    assert mid.item() == pytest.approx(math.sqrt(sched.sigmas[10].item() * sched.sigmas[11].item()), rel=1e-12)
    # Clamped to [0, 999]; sigma = 0 is finite and maps to t = 0.
    out = sched.sigma_to_t(torch.tensor([0.0, 1e-3, 100.0], dtype=torch.float64))
    assert out.tolist() == [0.0, 0.0, 999.0]
    assert sched.t_to_sigma(torch.tensor([-5.0, 2000.0], dtype=torch.float64)).tolist() == pytest.approx(
        [sched.sigma_min, sched.sigma_max], rel=1e-12
    )
    # dtype follows the input (float32 sigma in, float32 t out), as the denoiser needs.
    assert sched.sigma_to_t(torch.tensor([1.0])).dtype == torch.float32


@pytest.mark.parametrize("steps", [10, 25])
def test_default_sigmas_vs_diffusers_euler(sched, steps):
    ours = sched.default_sigmas(steps)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert ours[0].item() == pytest.approx(sched.sigma_max, rel=1e-6)
    assert ours[-2].item() == pytest.approx(sched.sigma_min, rel=1e-6)
    assert ours[-1].item() == 0.0

    ref = EulerDiscreteScheduler(**SD1_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    t = ref.timesteps.double()
    assert torch.allclose(t, torch.linspace(999, 0, steps, dtype=torch.float64), atol=1e-3)
    # Same timesteps, but at a fractional t diffusers interpolates sigma linearly while k-diffusion
    # interpolates log-sigma. On an interval whose log-sigmas differ by a, the two differ by at most
    # a^2/8 in log (log(1 + w(e^a - 1)) - w a peaks just under a^2/8). For 10 steps every t is an
    # integer (999/9 = 111) and only the float32 schedule error remains.
    lo = t.floor().long().clamp(max=998)
    a = sched.log_sigmas[lo + 1] - sched.log_sigmas[lo]
    frac = (t - t.floor()) > 0
    bound = torch.where(frac, a**2 / 8, torch.zeros_like(a)) + FLOAT32_SCHEDULE_RTOL
    gap = (ours[:-1].double().log() - ref.sigmas[:-1].double().log()).abs()
    assert (gap <= bound).all(), (gap - bound).max()
    assert ref.sigmas[-1].item() == 0.0


@pytest.mark.parametrize("steps", [1, 10, 25])
def test_karras_sigmas(sched, steps):
    ours = sched.karras_sigmas(steps)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert ours[0].item() == pytest.approx(sched.sigma_max, rel=1e-6)
    assert ours[-1].item() == 0.0
    if steps > 1:
        assert ours[-2].item() == pytest.approx(sched.sigma_min, rel=1e-6)
        assert (ours[1:] < ours[:-1]).all()
        # Evenly spaced in sigma^(1/rho).
        inv = ours[:-1].double() ** (1 / 7)
        assert torch.allclose(inv.diff(), inv.diff()[:1].expand(steps - 1), rtol=1e-5)
        # diffusers' Karras sigmas: same formula between its float32 sigma_min/max.
        ref = DPMSolverMultistepScheduler(**SD1_CONFIG, use_karras_sigmas=True)
        ref.set_timesteps(steps)
        assert torch.allclose(ours.double(), ref.sigmas.double(), rtol=FLOAT32_SCHEDULE_RTOL, atol=0)
        # It hands the model round(t(sigma)); our sigma_to_t gives the unrounded t.
        t_ours = sched.sigma_to_t(ref.sigmas[:-1].double())
        assert ((t_ours - ref.timesteps.double()).abs() <= 0.5 + 1e-3).all()


@pytest.mark.parametrize("steps", [1, 10, 25, 30])
def test_ddim_sigmas_vs_diffusers(sched, steps):
    ref = DDIMScheduler(**SD1_DDIM_CONFIG)
    ref.set_timesteps(steps)
    assert sched.ddim_timesteps(steps).tolist() == ref.timesteps.tolist()
    ac = ref.alphas_cumprod.double()
    # diffusers' DDIM steps from alphas_cumprod[t_i] to alphas_cumprod[t_{i+1}] and finally to
    # final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one=False): as sigmas, that is
    # sigma(t_0..t_{n-1}) then sigma(0).
    ref_ac = torch.cat([ac[ref.timesteps], ref.final_alpha_cumprod.double().view(1)])
    ref_sigmas = ((1 - ref_ac) / ref_ac).sqrt()
    ours = sched.ddim_sigmas(steps)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.allclose(ours.double(), ref_sigmas, rtol=FLOAT32_SCHEDULE_RTOL, atol=0)
    assert ours[-1].item() == pytest.approx(sched.sigma_min, rel=1e-6)


def test_steps_validation(sched):
    for fn in (sched.default_sigmas, sched.karras_sigmas, sched.ddim_sigmas, sched.sgm_uniform_sigmas,
               sched.turbo_sigmas, sched.lcm_sigmas):
        for bad in (0, -3):
            with pytest.raises(ValueError, match="steps"):
                fn(bad)
        with pytest.raises(ValueError, match="steps"):
            fn(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="999"):
        sched.ddim_sigmas(1000)
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))  # not decreasing


# --------------------------------------------------------------------------- sampler lookup


def test_get_sampler_names_and_aliases():
    assert list(SAMPLERS) == [
        "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM",
        "LCM", "LCM Karras", "Euler A Turbo", "DPM++ 2M Turbo",
        "Euler SGMUniform", "Euler A SGMUniform", "DPM++ 2M SGMUniform",
    ]
    for name, spec in SAMPLERS.items():
        assert spec.name == name and get_sampler(name) is spec
        assert get_sampler(name.upper()) is spec
    assert get_sampler("euler_a").method == "euler_ancestral"
    assert get_sampler("euler_ancestral").ancestral
    assert get_sampler("dpmpp_2m").schedule == "default"
    assert get_sampler("dpmpp_2m_karras") is SAMPLERS["DPM++ 2M Karras"]
    assert get_sampler("k_euler") is SAMPLERS["Euler"]
    assert get_sampler(" ddim ").schedule == "ddim"


def test_get_sampler_unknown_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        get_sampler("heun")
    for name in SAMPLERS:
        assert name in str(exc.value)


def test_ancestral_without_noise_fn_raises(sched):
    spec = get_sampler("Euler a")
    sigmas = sched.default_sigmas(4)
    with pytest.raises(ValueError, match="noise_fn"):
        sample(spec, make_denoiser(sched.sigma_to_t), noise_latents(0) * sigmas[0], sigmas)


def test_sample_rejects_bad_sigmas(sched):
    d = make_denoiser(sched.sigma_to_t)
    with pytest.raises(ValueError):
        sample(get_sampler("Euler"), d, noise_latents(0), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        sample(get_sampler("Euler"), d, noise_latents(0), torch.tensor([1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------- parity with diffusers


def test_euler_matches_diffusers():
    steps = 25
    ref = EulerDiscreteScheduler(**SD1_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    n0 = noise_latents(1)
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma)

    sigmas = ref.sigmas.clone()
    den = make_denoiser(lookup_t(sigmas[:-1], ref.timesteps))
    calls: list[tuple[int, int]] = []
    ours = sample(get_sampler("Euler"), den, n0 * sigmas[0], sigmas, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(i, steps) for i in range(steps)]
    assert_close_scaled(ours, expected)


def test_euler_end_to_end_with_our_schedule(sched):
    # Our own sigmas and t(sigma): at 10 steps diffusers' timesteps are integers (999, 888, ..., 0), so
    # the schedules differ only by float32-vs-float64 (<= 1.3e-5 rel per sigma) and our t(sigma)
    # recovers diffusers' integer t to ~1e-4 (a float32 sigma looked up in a log-sigma table; the toy
    # model's d eps/dt is <= 2.5e-3). Those input gaps would be visible at >= 1e-5 only if amplified
    # ~1x through every step; the measured effect is 4e-7, so 1e-4 is a bound with margin, not a fudge.
    steps = 10
    ref = EulerDiscreteScheduler(**SD1_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    n0 = noise_latents(2)
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma)
    spec = get_sampler("Euler")
    sigmas = sampler_sigmas(spec, sched, steps)
    ours = sample(spec, make_denoiser(sched.sigma_to_t), n0 * sigmas[0], sigmas)
    assert_close_scaled(ours, expected, rtol=1e-4)


def test_euler_ancestral_matches_diffusers():
    steps = 20
    ref = EulerAncestralDiscreteScheduler(**SD1_CONFIG, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    n0 = noise_latents(3)
    # diffusers' step() draws randn_tensor(shape, generator=g) = torch.randn(shape, generator=g) once
    # per step, the last step included (there sigma_up = 0, so that draw is unused). Replaying the
    # same generator in the same order reproduces its draws; we index them by step.
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma, generator=torch.Generator().manual_seed(77))
    g = torch.Generator().manual_seed(77)
    draws = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    used: list[int] = []

    def noise_fn(i: int) -> torch.Tensor:
        used.append(i)
        return draws[i]

    sigmas = ref.sigmas.clone()
    den = make_denoiser(lookup_t(sigmas[:-1], ref.timesteps))
    ours = sample(get_sampler("Euler a"), den, n0 * sigmas[0], sigmas, noise_fn=noise_fn)
    # No noise is drawn for the step that lands on sigma = 0 (k-diffusion convention).
    assert used == list(range(steps - 1))
    assert_close_scaled(ours, expected)


@pytest.mark.parametrize("karras", [False, True], ids=["DPM++ 2M", "DPM++ 2M Karras"])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_matches_diffusers(karras, steps):
    ref = DPMSolverMultistepScheduler(
        **SD1_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )
    ref.set_timesteps(steps)
    n0 = noise_latents(4)
    # DPMSolverMultistep works on the VP latent x_vp = x / sqrt(sigma^2 + 1) and starts from unit
    # noise (init_noise_sigma = 1): the same state in our scale is noise * sqrt(sigma_0^2 + 1).
    # Its final sigma is 0, where the two scales coincide.
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma)
    sigmas = ref.sigmas.clone()
    den = make_denoiser(lookup_t(sigmas[:-1], ref.timesteps))
    spec = get_sampler("DPM++ 2M Karras" if karras else "DPM++ 2M")
    ours = sample(spec, den, n0 * math.sqrt(sigmas[0].item() ** 2 + 1), sigmas)
    assert_close_scaled(ours, expected)


def test_dpmpp_2m_img2img_slice_matches_diffusers():
    # diffusers' img2img runs timesteps[k:] with set_begin_index(k) and a fresh solver state, so its
    # first step of the slice is first order, as ours must be.
    steps, k = 20, 8
    ref = DPMSolverMultistepScheduler(**SD1_CONFIG, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(steps)
    start_vp = noise_latents(5) * 0.7 + 0.3 * noise_latents(6)
    expected = run_diffusers(ref, start_vp.clone(), begin=k)
    sigmas = ref.sigmas[k:].clone()
    den = make_denoiser(lookup_t(ref.sigmas[:-1], ref.timesteps))
    ours = sample(get_sampler("DPM++ 2M"), den, start_vp * math.sqrt(sigmas[0].item() ** 2 + 1), sigmas)
    assert_close_scaled(ours, expected)


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers(sched, steps):
    ref = DDIMScheduler(**SD1_DDIM_CONFIG)
    ref.set_timesteps(steps)
    n0 = noise_latents(7)
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma)  # eta defaults to 0 in step()

    # diffusers' own sigmas: its alphas at its timesteps, then final_alpha_cumprod.
    ac = ref.alphas_cumprod
    ref_ac = torch.cat([ac[ref.timesteps], ref.final_alpha_cumprod.view(1)])
    sigmas = ((1 - ref_ac) / ref_ac).sqrt()
    den = make_denoiser(lookup_t(sigmas[:-1], ref.timesteps))
    # VP latent x_vp = sqrt(ac) * x in both directions: in at ac[t_0], out at ac_prev of the last step
    # = alphas_cumprod[0]. (diffusers' DDIM output is that VP latent, still carrying sigma_min noise.)
    x_in = n0 / ref_ac[0].sqrt()
    ours = sample(get_sampler("DDIM"), den, x_in, sigmas)
    assert_close_scaled(ours * ref_ac[-1].sqrt(), expected)

    # And with our own float64-derived DDIM sigmas and t(sigma): only the float32 schedule gap remains
    # (same argument and bound as test_euler_end_to_end_with_our_schedule).
    own = sampler_sigmas(get_sampler("DDIM"), sched, steps)
    ours2 = sample(get_sampler("DDIM"), make_denoiser(sched.sigma_to_t), n0 / ref_ac[0].sqrt(), own)
    assert_close_scaled(ours2 * math.sqrt(sched.alphas_cumprod[0].item()), expected, rtol=1e-4)


# --------------------------------------------------------------------------- img2img slices


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_tail_slice_with_ideal_denoiser(sched, name):
    """img2img passes sigmas[k:]. With the ideal denoiser of a single point (D = x0), every sampler
    lands exactly on x0 plus the final sigma's share of the noise (0 except for DDIM)."""
    spec = get_sampler(name)
    full = sampler_sigmas(spec, sched, 20)
    sigmas = full[7:]
    x0 = noise_latents(8)
    n = noise_latents(9)
    x = x0 + sigmas[0] * n
    g = torch.Generator().manual_seed(10)
    seen: list[tuple[int, int]] = []
    out = sample(
        spec,
        lambda x_, s_: x0.expand_as(x_),
        x,
        sigmas,
        noise_fn=lambda i: torch.randn(SHAPE, generator=g),
        callback=lambda i, tot: seen.append((i, tot)),
    )
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert seen == [(i, len(sigmas) - 1) for i in range(len(sigmas) - 1)]
    last = sigmas[-1].item()
    target = x0 + last * n
    assert torch.allclose(out, target, atol=1e-5 * sigmas[0].item())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_tail_slice_with_toy_model_runs(sched, name):
    spec = get_sampler(name)
    full = sampler_sigmas(spec, sched, 12)
    sigmas = full[5:]
    g = torch.Generator().manual_seed(11)
    x = noise_latents(12) + sigmas[0] * noise_latents(13)
    out = sample(spec, make_denoiser(sched.sigma_to_t), x, sigmas, noise_fn=lambda i: torch.randn(SHAPE, generator=g))
    assert torch.isfinite(out).all()
    assert out.shape == SHAPE


def test_sampler_sigmas_dispatch(sched):
    for name, spec in SAMPLERS.items():
        s = sampler_sigmas(spec, sched, 7)
        assert s.shape == (8,) and s.dtype == torch.float32
    assert torch.equal(sampler_sigmas(SAMPLERS["DPM++ 2M"], sched, 7), sched.default_sigmas(7))
    assert torch.equal(sampler_sigmas(SAMPLERS["DPM++ 2M Karras"], sched, 7), sched.karras_sigmas(7))
    assert torch.equal(sampler_sigmas(SAMPLERS["DDIM"], sched, 7), sched.ddim_sigmas(7))
    assert torch.equal(sampler_sigmas(SAMPLERS["LCM"], sched, 7), sched.lcm_sigmas(7))
    assert torch.equal(sampler_sigmas(SAMPLERS["Euler A Turbo"], sched, 7), sched.turbo_sigmas(7))
    assert torch.equal(sampler_sigmas(SAMPLERS["Euler SGMUniform"], sched, 7), sched.sgm_uniform_sigmas(7))
    with pytest.raises(ValueError):
        sampler_sigmas(SamplerSpec("x", "euler", "nope", False), sched, 7)

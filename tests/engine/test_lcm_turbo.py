"""Few-step samplers: "LCM" (Latent Consistency Models) and the Turbo / SGM Uniform schedules
(SD-Turbo, SDXL-Turbo), checked against diffusers' LCMScheduler and its "trailing" Euler schedulers on the
toy eps-model of test_samplers.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.samplers import SAMPLERS, get_sampler, sample, sampler_sigmas
from engine.schedule import DiscreteSchedule
from tests.engine.test_samplers import (
    FLOAT32_SCHEDULE_RTOL,
    PARITY_RTOL,
    SD1_CONFIG,
    SHAPE,
    assert_close_scaled,
    lookup_t,
    make_denoiser,
    noise_latents,
    run_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NEW_NAMES = [
    "LCM",
    "LCM Karras",
    "Euler A Turbo",
    "DPM++ 2M Turbo",
    "Euler SGMUniform",
    "Euler A SGMUniform",
    "DPM++ 2M SGMUniform",
]


@pytest.fixture(scope="module")
def sched() -> DiscreteSchedule:
    return DiscreteSchedule.sd1()


# --------------------------------------------------------------------------- names


def test_new_names_resolve():
    for name in NEW_NAMES:
        spec = SAMPLERS[name]
        assert get_sampler(name) is spec and get_sampler(name.lower()) is spec
    lcm = get_sampler("LCM")
    assert (lcm.method, lcm.schedule, lcm.ancestral) == ("lcm", "lcm", True)
    assert get_sampler("k_lcm") is lcm and get_sampler("lcm_karras").schedule == "karras"
    # Forge's aliases, its lower-case "a" spelling, and A1111 >= 1.9's "SGM Uniform" spelling.
    assert get_sampler("euler_ancestral_turbo") is SAMPLERS["Euler A Turbo"]
    assert get_sampler("Euler a Turbo") is SAMPLERS["Euler A Turbo"]
    assert get_sampler("euler_ancestral_sgm_uniform") is SAMPLERS["Euler A SGMUniform"]
    assert get_sampler("Euler a SGM Uniform") is SAMPLERS["Euler A SGMUniform"]
    assert get_sampler("dpmpp_2m_sgm_uniform") is SAMPLERS["DPM++ 2M SGMUniform"]
    assert get_sampler("dpmpp_2m_turbo").schedule == "turbo"
    assert get_sampler("Euler A Turbo").ancestral and get_sampler("Euler A SGMUniform").ancestral
    assert not get_sampler("DPM++ 2M Turbo").ancestral


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 10])
@pytest.mark.parametrize("cls", [EulerAncestralDiscreteScheduler, EulerDiscreteScheduler])
def test_turbo_sigmas_are_diffusers_trailing(sched, cls, steps):
    ref = cls(**SD1_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    t = sched.turbo_timesteps(steps)
    assert t.tolist() == ref.timesteps.long().tolist()
    assert t.tolist() == (np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1).tolist()
    ours = sampler_sigmas(get_sampler("Euler A Turbo"), sched, steps)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert ours[-1].item() == 0.0 and ref.sigmas[-1].item() == 0.0
    assert torch.allclose(ours[:-1].double(), ref.sigmas[:-1].double(), rtol=FLOAT32_SCHEDULE_RTOL, atol=0)
    assert torch.equal(sampler_sigmas(get_sampler("DPM++ 2M Turbo"), sched, steps), ours)
    if steps == 1:
        assert t.tolist() == [999] and ours[0].item() == pytest.approx(sched.sigma_max, rel=1e-6)
    if steps == 4:  # ADD's student timesteps
        assert t.tolist() == [999, 749, 499, 249]


def test_turbo_vs_trailing_ties(sched):
    # Forge rounds j*N/n - 1, diffusers round(N - k*N/n) - 1: both half-to-even, so they part only where
    # j*N/n is a half-integer (16, 32, 48 steps in 1..50), and then by one timestep.
    for steps in range(1, 51):
        ours = sched.turbo_timesteps(steps)
        ref = torch.from_numpy(np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1)
        gap = (ours - ref).abs().max().item()
        assert gap == (1 if steps in (16, 32, 48) else 0), steps


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 25])
def test_sgm_uniform_sigmas(sched, steps):
    ours = sampler_sigmas(get_sampler("Euler SGMUniform"), sched, steps)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1].item() == 0.0
    t = sched.sigma_to_t(ours[:-1].double())
    expected = torch.linspace(999, 0, steps + 1, dtype=torch.float64)[:-1]
    # float32 sigmas read back through the log-sigma table: ~1e-4 in t.
    assert torch.allclose(t, expected, atol=2e-3)
    # Within half a timestep of diffusers' trailing spacing (SGM Uniform does not round t).
    ref = EulerDiscreteScheduler(**SD1_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert ((t - ref.timesteps.double()).abs() <= 1.0 + 2e-3).all()
    if steps == 1:
        assert torch.allclose(ours, sched.turbo_sigmas(1))
    for name in ("Euler A SGMUniform", "DPM++ 2M SGMUniform"):
        assert torch.equal(sampler_sigmas(get_sampler(name), sched, steps), ours)


@pytest.mark.parametrize("steps", list(range(1, 51)))
def test_lcm_timesteps_match_diffusers(sched, steps):
    ref = LCMScheduler(**SD1_CONFIG)
    ref.set_timesteps(steps)
    assert sched.lcm_timesteps(steps).tolist() == ref.timesteps.long().tolist()


def test_lcm_sigmas(sched):
    assert sched.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    s = sampler_sigmas(get_sampler("LCM"), sched, 4)
    assert s.shape == (5,) and s[-1].item() == 0.0
    assert torch.allclose(s[:-1].double(), sched.sigmas[[999, 759, 499, 259]], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="50"):
        sched.lcm_sigmas(51)
    with pytest.raises(ValueError, match="steps"):
        sched.lcm_sigmas(0)
    assert torch.equal(sampler_sigmas(get_sampler("LCM Karras"), sched, 6), sched.karras_sigmas(6))


# --------------------------------------------------------------------------- LCM vs diffusers


def _run_lcm_pair(steps: int, timestep_scaling: float, seed: int):
    ref = LCMScheduler(**SD1_CONFIG, clip_sample=False, timestep_scaling=timestep_scaling)
    ref.set_timesteps(steps)
    n0 = noise_latents(seed)
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma, generator=torch.Generator().manual_seed(99))
    # diffusers draws one randn per step but the last, in step order, from the generator it is given.
    g = torch.Generator().manual_seed(99)
    draws = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    used: list[int] = []

    def noise_fn(i: int) -> torch.Tensor:
        used.append(i)
        return draws[i]

    ac = ref.alphas_cumprod[ref.timesteps]
    sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    den = make_denoiser(lookup_t(sigmas[:-1], ref.timesteps))
    # diffusers' LCM loop works on the VP latent and starts from unit noise: ours is that / sqrt(ac_0).
    ours = sample(get_sampler("LCM"), den, n0 / ac[0].sqrt(), sigmas, noise_fn=noise_fn)
    assert used == list(range(steps - 1))
    return ours, expected  # the final sigma is 0: both are x0, in the same scale


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers_without_boundary_condition(steps):
    # A huge timestep_scaling makes diffusers' c_skip 0 and c_out 1 to float32: the update formulas must
    # then agree to float32 rounding.
    ours, expected = _run_lcm_pair(steps, 1e8, seed=20 + steps)
    assert_close_scaled(ours, expected)


@pytest.mark.parametrize("steps", [2, 4, 8, 50])
def test_lcm_boundary_condition_gap(steps):
    """With diffusers' default timestep_scaling = 10 the boundary condition moves each step's denoised by
    c_skip * x_vp - (1 - c_out) * D, largest at the last (smallest) timestep and, there, not re-noised: the
    final gap is ~(c_skip + 1 - c_out) of the latent's scale (|x_vp| ~ |D| near t = 0): 5.6e-8 at 4 steps
    (t = 259), 1.9e-7 at 8 (t = 139), 1.0e-5 at 50 (t = 19). Our LCM leaves it out (k-diffusion / ComfyUI /
    Forge); the bound is float32 rounding plus twice that estimate."""
    ours, expected = _run_lcm_pair(steps, 10.0, seed=40 + steps)
    ref = LCMScheduler(**SD1_CONFIG)
    ref.set_timesteps(steps)
    st = 10.0 * float(ref.timesteps[-1])
    c_skip = 0.25 / (st**2 + 0.25)
    one_minus_c_out = 1.0 - st / math.sqrt(st**2 + 0.25)
    assert_close_scaled(ours, expected, rtol=PARITY_RTOL + 2 * (c_skip + one_minus_c_out))
    if steps == 50:
        # ... and at t = 19 it is real: well above float32 rounding (~5e-7), so the test would see it.
        gap = (ours - expected).abs().max().item() / expected.abs().max().item()
        assert gap > 2e-6


def test_lcm_ideal_denoiser_and_slice(sched):
    # With D = x0 every step lands on x0 (plus sigma_next of fresh noise), and the last on x0 exactly.
    x0 = noise_latents(60)
    sigmas = sampler_sigmas(get_sampler("LCM"), sched, 8)[3:]
    g = torch.Generator().manual_seed(61)
    out = sample(get_sampler("LCM"), lambda x, s: x0.expand_as(x), x0 + sigmas[0] * noise_latents(62), sigmas,
                 noise_fn=lambda i: torch.randn(SHAPE, generator=g))
    assert torch.equal(out, x0)


def test_lcm_needs_noise_fn(sched):
    sigmas = sampler_sigmas(get_sampler("LCM"), sched, 4)
    with pytest.raises(ValueError, match="noise_fn"):
        sample(get_sampler("LCM"), make_denoiser(sched.sigma_to_t), noise_latents(0) * sigmas[0], sigmas)


# --------------------------------------------------------------------------- Turbo end to end


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_a_turbo_matches_diffusers_trailing(sched, steps):
    """SDXL-Turbo's recipe: EulerAncestralDiscreteScheduler(timestep_spacing="trailing"), 1-4 steps."""
    ref = EulerAncestralDiscreteScheduler(**SD1_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    n0 = noise_latents(70 + steps)
    expected = run_diffusers(ref, n0 * ref.init_noise_sigma, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    spec = get_sampler("Euler A Turbo")
    # Our own sigmas and t(sigma): integer timesteps, so only the float32 schedule gap remains (the
    # test_euler_end_to_end_with_our_schedule argument and bound).
    sigmas = sampler_sigmas(spec, sched, steps)
    ours = sample(spec, make_denoiser(sched.sigma_to_t), n0 * sigmas[0], sigmas, noise_fn=lambda i: draws[i])
    assert_close_scaled(ours, expected, rtol=1e-4)
    # And exactly diffusers' sigmas and timesteps: float32 rounding only.
    den = make_denoiser(lookup_t(ref.sigmas[:-1], ref.timesteps))
    ours2 = sample(spec, den, n0 * ref.sigmas[0], ref.sigmas.clone(), noise_fn=lambda i: draws[i])
    assert_close_scaled(ours2, expected)

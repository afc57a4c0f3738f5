"""The SD 1.x discrete noise schedule, seen in k-diffusion's sigma space.

Stable Diffusion was trained as a discrete-time VP model: x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps
for t in 0..999. Dividing by sqrt(ac_t) gives the variance-exploding form the samplers use,
x = x0 + sigma * eps with sigma_t = sqrt((1 - ac_t) / ac_t). The samplers only ever see sigmas;
this module turns step counts into sigma sequences and maps sigmas back to the (fractional)
timestep the UNet's timestep embedding expects.

Everything is computed in float64 (the cumulative product over 1000 steps and the 1 - ac
cancellation near t=0 lose ~1e-4 relative in float32) and the sigma sequences handed to the
samplers are float32, the dtype sampling runs in.
"""

from __future__ import annotations

import torch

__all__ = ["DiscreteSchedule"]

# SD 1.x "scaled_linear" betas: linear in sqrt(beta) between these values.
_SD1_BETA_START = 0.00085
_SD1_BETA_END = 0.012
_SD1_TRAIN_STEPS = 1000


def _check_steps(steps: int) -> int:
    # bool is an int subclass; True steps is a bug at the call site, not a request for one step.
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def _work_device(device: torch.device) -> torch.device:
    # MPS has no float64; these are (B,)-sized tensors, so doing the math on the CPU costs nothing.
    return torch.device("cpu") if device.type == "mps" else device


class DiscreteSchedule:
    """SD 1.x discrete noise schedule in k-diffusion sigma space."""

    alphas_cumprod: torch.Tensor  # float64, (N,)
    sigmas: torch.Tensor  # float64 training sigmas sqrt((1-ac)/ac), (N,), increasing with t
    log_sigmas: torch.Tensor  # float64, (N,)
    sigma_min: float
    sigma_max: float

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        if not bool((ac[1:] < ac[:-1]).all()):
            # sigma_to_t's interpolation needs log-sigmas strictly increasing in t.
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self.sigmas = ((1.0 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    @classmethod
    def sd1(cls) -> "DiscreteSchedule":
        """The schedule every SD 1.x checkpoint was trained with."""
        betas = (
            torch.linspace(_SD1_BETA_START**0.5, _SD1_BETA_END**0.5, _SD1_TRAIN_STEPS, dtype=torch.float64) ** 2
        )
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.numel())

    # ------------------------------------------------------------------ sigma <-> t

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for each sigma: linear interpolation of log-sigma between the
        two neighbouring training sigmas (k-diffusion's DiscreteSchedule.sigma_to_t), clamped
        to [0, N-1]. Returns the input's floating dtype (float32 for a non-float input)."""
        sigma = torch.as_tensor(sigma)
        out_dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        dev = _work_device(sigma.device)
        log_sigmas = self.log_sigmas.to(dev)
        # The tiny floor keeps sigma=0 finite: it maps to t=0 through the clamp below.
        log_sigma = sigma.to(device=dev, dtype=torch.float64).clamp_min(1e-30).log()
        n = log_sigmas.numel()
        # searchsorted finds the first training log-sigma >= ours; the interval starts one before.
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous()) - 1).clamp(0, n - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
        t = low.to(torch.float64) + w
        return t.to(device=sigma.device, dtype=out_dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep: the inverse of sigma_to_t (log-sigma interpolated
        linearly in t). t is clamped to [0, N-1]."""
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        dev = _work_device(t.device)
        log_sigmas = self.log_sigmas.to(dev)
        n = log_sigmas.numel()
        tt = t.to(device=dev, dtype=torch.float64).clamp(0.0, n - 1)
        low = tt.floor().long().clamp(0, n - 2)
        w = tt - low.to(torch.float64)  # in [0, 1]; w = 1 only at t = N-1
        log_sigma = (1.0 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        return log_sigma.exp().to(device=t.device, dtype=out_dtype)

    # ------------------------------------------------------------------ sigma sequences

    def default_sigmas(self, steps: int) -> torch.Tensor:
        """k-diffusion's default discretisation (A1111 "Euler", "DPM++ 2M"): timesteps evenly
        spaced from N-1 down to 0, mapped to sigmas, then 0 appended. Shape (steps+1,), float32."""
        _check_steps(steps)
        t = torch.linspace(self.num_train_timesteps - 1, 0, steps, dtype=torch.float64)
        return self._finish(self.t_to_sigma(t), 0.0)

    def karras_sigmas(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. (2022) eq. 5 between sigma_min and sigma_max: evenly spaced in
        sigma^(1/rho), which puts more steps at low noise. 0 appended. Shape (steps+1,), float32."""
        _check_steps(steps)
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        # linspace(0, 1, 1) == [0]: a single step starts at sigma_max, as k-diffusion does.
        ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        max_inv_rho = self.sigma_max ** (1.0 / rho)
        min_inv_rho = self.sigma_min ** (1.0 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        return self._finish(sigmas, 0.0)

    def sgm_uniform_sigmas(self, steps: int) -> torch.Tensor:
        """A1111 / Forge "SGM Uniform" (ComfyUI "sgm_uniform"): timesteps evenly spaced from N-1 towards 0
        with `steps + 1` points and the last (t = 0) dropped, i.e. linspace(N-1, 0, steps+1)[:-1], mapped to
        sigmas (log-sigma interpolated at fractional t, as k-diffusion / ComfyUI do), then 0 appended.
        The "trailing"-like spacing Stability's SGM code uses: the run never visits the t=0 sigma, so few-step
        (Turbo / LCM) models get one more useful step. Shape (steps+1,), float32."""
        _check_steps(steps)
        t = torch.linspace(self.num_train_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
        return self._finish(self.t_to_sigma(t), 0.0)

    def turbo_timesteps(self, steps: int) -> torch.Tensor:
        """Forge's "Turbo" scheduler ("Euler A Turbo", "DPM++ 2M Turbo"), descending integer timesteps:
        round(j * N/steps - 1) for j = steps..1, clamped to [0, N-1]. For steps 1..10 these are exactly
        diffusers' timestep_spacing="trailing" (round(arange(N, 0, -N/steps)) - 1), the spacing SD-Turbo /
        SDXL-Turbo are run with (1 step = t 999; 4 steps = 999, 749, 499, 249, ADD's student timesteps). The
        two differ only where j * N/steps is exactly a half-integer (e.g. 16 steps): both round half to even,
        one before and one after subtracting 1."""
        _check_steps(steps)
        n = self.num_train_timesteps
        j = torch.arange(steps, 0, -1, dtype=torch.float64)
        return (j * (n / steps) - 1.0).round().clamp(0, n - 1).to(torch.int64)

    def turbo_sigmas(self, steps: int) -> torch.Tensor:
        """Training sigmas at :meth:`turbo_timesteps`, then 0 appended. Shape (steps+1,), float32."""
        return self._finish(self.sigmas[self.turbo_timesteps(steps)], 0.0)

    def lcm_timesteps(self, steps: int, original_steps: int = 50) -> torch.Tensor:
        """The Latent Consistency Model timesteps (diffusers LCMScheduler, written by the LCM authors, with
        original_inference_steps=50): the distillation grid k*c - 1 for k = 1..original_steps, c = N //
        original_steps (19, 39, ..., 999), descending, indexed at floor(linspace(0, original_steps, steps,
        endpoint=False)). 4 steps = 999, 759, 499, 259. At most `original_steps` steps."""
        _check_steps(steps)
        n = self.num_train_timesteps
        if not 1 <= original_steps <= n:
            raise ValueError(f"original_steps must be in 1..{n}, got {original_steps}")
        if steps > original_steps:
            raise ValueError(f"LCM supports at most {original_steps} steps (its distillation grid), got {steps}")
        c = n // original_steps
        grid = (torch.arange(original_steps, 0, -1, dtype=torch.int64) * c - 1)  # descending
        idx = torch.floor(torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).to(torch.int64)
        return grid[idx]

    def lcm_sigmas(self, steps: int) -> torch.Tensor:
        """Training sigmas at :meth:`lcm_timesteps`, then 0 appended (LCM's last step returns the
        denoised estimate). Shape (steps+1,), float32."""
        return self._finish(self.sigmas[self.lcm_timesteps(steps)], 0.0)

    def ddim_timesteps(self, steps: int) -> torch.Tensor:
        """DDIM's integer timesteps, descending: A1111/CompVis "uniform" = diffusers DDIMScheduler
        with SD's config (timestep_spacing="leading", steps_offset=1): arange(steps) * (N // steps) + 1."""
        _check_steps(steps)
        n = self.num_train_timesteps
        if steps >= n:
            # With offset 1 the top timestep would be N, one past the table (diffusers fails the same way).
            raise ValueError(f"DDIM supports at most {n - 1} steps, got {steps}")
        ratio = n // steps
        return (torch.arange(steps, dtype=torch.int64) * ratio + 1).flip(0)

    def ddim_sigmas(self, steps: int) -> torch.Tensor:
        """Sigmas of DDIM's timesteps, then the sigma DDIM's last step lands on. Shape (steps+1,), float32.

        DDIM (eta=0) in VP form is x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. Divided by
        sqrt(a_prev) that is x0 + sigma_prev * eps, i.e. an Euler step with d = eps = (x - D)/sigma
        from sigma_t to sigma_prev in k-diffusion space. SD's DDIM config has set_alpha_to_one=False,
        so the last step's "previous" alpha is alphas_cumprod[0], not 1: the sequence ends at the
        training sigma of t=0 (~0.029), NOT at 0, and the sampled latent keeps that little noise,
        exactly as with diffusers' and A1111's DDIM. (diffusers' result is the VP latent, i.e. ours
        times sqrt(alphas_cumprod[0]).)"""
        ts = self.ddim_timesteps(steps)
        return self._finish(self.sigmas[ts], float(self.sigmas[0]))

    @staticmethod
    def _finish(sigmas: torch.Tensor, last: float) -> torch.Tensor:
        full = torch.cat([sigmas.to(torch.float64), torch.tensor([last], dtype=torch.float64)])
        return full.to(torch.float32)

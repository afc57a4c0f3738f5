"""txt2img, img2img and inpainting over a batch of requests: the engine's public entry point.

Callers (the CLI, the campaign flows) hand over any list of :class:`GenerationRequest`; the pipeline groups
the ones that can share a U-Net batch (same size, steps, sampler, mode), runs each group with classifier-free
guidance (cond and uncond in one batch), and returns one :class:`GenerationResult` per request, in order.

Reproducibility: each image gets its own CPU generator seeded with its seed; its initial noise and every
ancestral noise draw come from that generator in float32, then move to the device. The same seed therefore
gives the same image whatever the batch size, the position in the batch, or ``-n``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from engine.conditioning import PromptEncoder
from engine.devices import resolve_device, resolve_dtype
from engine.image_ops import fit_image, latent_mask, mask_to_tensor, pil_to_tensor01, tensor01_to_pil
from engine.models import SD1Models, load_sd1
from engine.samplers import SamplerSpec, get_sampler, sample, sampler_sigmas
from engine.schedule import DiscreteSchedule

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (steps done, steps total) across the whole generate() call


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 25
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M Karras"
    clip_skip: int = 1
    init_image: Image.Image | None = None
    # Share of the schedule re-run over the init image: 0 keeps it, 1 repaints from (almost) pure noise.
    strength: float = 0.75
    mask: Image.Image | None = None  # white = repaint; needs init_image
    mask_blur: int = 4

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def validate(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value < 8 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init image to inpaint")
        get_sampler(self.sampler)

    def batch_key(self) -> tuple:
        """Requests with equal keys run in one U-Net batch."""
        strength = self.strength if self.init_image is not None else None
        return (self.width, self.height, self.steps, get_sampler(self.sampler).name, self.mode, strength)


@dataclass
class GenerationResult:
    request: GenerationRequest
    image: Image.Image
    # The generation settings in A1111 infotext order ("Steps", "Sampler", "CFG scale", "Seed", ...).
    parameters: dict[str, str] = field(default_factory=dict)


def _fmt(value: float) -> str:
    return f"{value:g}"


class Pipeline:
    """An SD 1.x checkpoint loaded once and kept warm across many ``generate`` calls."""

    def __init__(self, models: SD1Models, *, max_batch_size: int = 8, schedule: DiscreteSchedule | None = None):
        self.models = models
        self.device = models.device
        self.dtype = models.dtype
        self.max_batch_size = max(1, max_batch_size)
        self.schedule = schedule or DiscreteSchedule.sd1()
        self.prompts = PromptEncoder(models.text_encoder, models.tokenizer, self.device, self.dtype)
        self.latent_channels = models.vae.config.z_channels
        self.vae_factor = models.vae.config.downscale_factor

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike[str],
        *,
        vae: str | os.PathLike[str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        max_batch_size: int = 8,
    ) -> "Pipeline":
        dev = resolve_device(device)
        models = load_sd1(checkpoint, vae_path=vae, device=dev, dtype=resolve_dtype(dtype, dev), allow_pickle=allow_pickle)
        return cls(models, max_batch_size=max_batch_size)

    # ---- public -------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest], progress: ProgressFn | None = None) -> list[GenerationResult]:
        for r in requests:
            r.validate()
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.batch_key(), []).append(i)
        batches = [idx[j : j + self.max_batch_size] for idx in groups.values() for j in range(0, len(idx), self.max_batch_size)]
        total = sum(self._steps_run(requests[b[0]]) for b in batches)
        done = 0

        def step(_: int, __: int) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in batches:
            for i, result in zip(batch, self._run_batch([requests[i] for i in batch], step)):
                results[i] = result
        return [r for r in results if r is not None]

    # ---- internals ----------------------------------------------------------------------------------------

    def _sigmas(self, req: GenerationRequest) -> torch.Tensor:
        spec = get_sampler(req.sampler)
        sigmas = sampler_sigmas(spec, self.schedule, req.steps)
        if req.init_image is None:
            return sigmas
        # img2img runs the last int(steps * strength) steps of the full schedule (at least one).
        run = max(1, min(req.steps, int(req.steps * req.strength)))
        return sigmas[req.steps - run :]

    def _steps_run(self, req: GenerationRequest) -> int:
        return len(self._sigmas(req)) - 1

    def _initial_noise(self, gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(self.device)

    @torch.inference_mode()
    def _run_batch(self, reqs: list[GenerationRequest], on_step: ProgressFn) -> list[GenerationResult]:
        first = reqs[0]
        spec: SamplerSpec = get_sampler(first.sampler)
        b = len(reqs)
        lh, lw = first.height // self.vae_factor, first.width // self.vae_factor
        shape = (self.latent_channels, lh, lw)
        gens = [torch.Generator("cpu").manual_seed(r.seed) for r in reqs]
        noise = self._initial_noise(gens, shape)
        sigmas = self._sigmas(first)

        cond = self._conditioning(reqs)
        cfg = torch.tensor([r.cfg_scale for r in reqs], dtype=torch.float32, device=self.device)

        init_latent = repaint = pixel_mask = init_pixels = concat = None
        if first.init_image is not None:
            init_pixels = torch.stack([pil_to_tensor01(fit_image(r.init_image, (r.width, r.height))) for r in reqs]).to(self.device)
            init_latent = self._encode(init_pixels)
        if first.mask is not None:
            size = (first.width, first.height)
            pixel_mask = torch.stack([mask_to_tensor(r.mask, size, r.mask_blur) for r in reqs]).to(self.device)  # type: ignore[arg-type]
            repaint = latent_mask(pixel_mask, self.vae_factor)
        if self.models.is_inpainting:
            concat = self._inpaint_concat(init_pixels, pixel_mask, b, (first.height, first.width))

        x = noise * sigmas[0] if init_latent is None else init_latent + noise * sigmas[0]
        denoiser = self._denoiser(cond, cfg, concat, init_latent if not self.models.is_inpainting else None, repaint)
        noise_fn = (lambda i: self._initial_noise(gens, shape)) if spec.ancestral else None
        latents = sample(spec, denoiser, x, sigmas, noise_fn=noise_fn, callback=on_step)

        images = self._decode(latents)
        if pixel_mask is not None and init_pixels is not None:
            # Keep the unmasked pixels exactly as given: the VAE round trip alone would soften them.
            images = init_pixels * (1 - pixel_mask) + images * pixel_mask
        return [
            GenerationResult(request=r, image=tensor01_to_pil(img), parameters=self._parameters(r))
            for r, img in zip(reqs, images)
        ]

    def _conditioning(self, reqs: list[GenerationRequest]) -> torch.Tensor:
        """(2B, tokens, hidden): cond rows then uncond rows, all padded to one token length."""
        texts = [r.prompt for r in reqs] + [r.negative_prompt for r in reqs]
        return self.prompts.encode_batch(texts, [r.clip_skip for r in reqs] * 2)

    def _denoiser(
        self,
        cond: torch.Tensor,
        cfg: torch.Tensor,
        concat: torch.Tensor | None,
        init_latent: torch.Tensor | None,
        repaint: torch.Tensor | None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        unet = self.models.unet
        schedule = self.schedule
        b = cfg.shape[0]
        # cfg 1 means "cond only": skip the uncond half of the batch entirely.
        use_uncond = bool((cfg != 1.0).any())
        context = cond if use_uncond else cond[:b]
        reps = 2 if use_uncond else 1
        concat_in = None if concat is None else concat.repeat(reps, 1, 1, 1).to(self.dtype)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            c_in = (1.0 / (sigma**2 + 1.0).sqrt())[:, None, None, None]
            t = schedule.sigma_to_t(sigma.double().cpu()).to(device=x.device, dtype=torch.float32)
            x_in = (x * c_in).repeat(reps, 1, 1, 1)
            if concat_in is not None:
                x_in = torch.cat([x_in.to(self.dtype), concat_in], dim=1)
            eps = unet(x_in, t.repeat(reps), context).float()
            if use_uncond:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + cfg[:, None, None, None] * (eps_c - eps_u)
            denoised = x - sigma[:, None, None, None] * eps
            if repaint is not None and init_latent is not None:
                # Regular (4-channel) models inpaint by pinning the kept area to the init image's latent.
                denoised = init_latent * (1 - repaint) + denoised * repaint
            return denoised

        return denoise

    def _inpaint_concat(
        self, init_pixels: torch.Tensor | None, pixel_mask: torch.Tensor | None, b: int, hw: tuple[int, int]
    ) -> torch.Tensor:
        """The 5 extra input channels of a 9-channel inpainting U-Net: mask, then the masked image's latent.

        With no mask (txt2img on an inpainting model) everything is "to repaint" over a blank image."""
        if pixel_mask is None:
            mask = torch.ones(b, 1, *hw, device=self.device)
        else:
            mask = (pixel_mask > 0.5).float()
        base = init_pixels if init_pixels is not None else torch.full((b, 3, *hw), 0.5, device=self.device)
        masked = base * (1 - mask) + 0.5 * mask  # masked area set to mid-grey (0 in [-1, 1] pixel space)
        masked_latent = self._encode(masked)
        return torch.cat([latent_mask(mask, self.vae_factor), masked_latent], dim=1)

    def _encode(self, pixels01: torch.Tensor) -> torch.Tensor:
        return self.models.vae.encode_latents(pixels01.to(self.dtype)).float()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        images = vae.decode_latents(latents.to(vae.dtype)).float()
        if not torch.isfinite(images).all() and vae.dtype != torch.float32:
            # SD 1.x VAEs overflow in float16 on some images; redo that decode in float32, like A1111.
            log.warning("VAE produced NaNs in %s; decoding in float32 from now on", vae.dtype)
            self.models.vae = vae.float()
            images = self.models.vae.decode_latents(latents.float()).float()
        return images

    def _parameters(self, r: GenerationRequest) -> dict[str, str]:
        m = self.models
        p = {
            "Steps": str(r.steps),
            "Sampler": get_sampler(r.sampler).name,
            "CFG scale": _fmt(r.cfg_scale),
            "Seed": str(r.seed),
            "Size": f"{r.width}x{r.height}",
            "Model hash": m.checkpoint.short_hash,
            "Model": m.checkpoint.name,
        }
        if m.vae_file is not None:
            p["VAE hash"] = m.vae_file.short_hash
            p["VAE"] = m.vae_file.name
        if r.init_image is not None:
            p["Denoising strength"] = _fmt(r.strength)
        if r.mask is not None:
            p["Mask blur"] = str(r.mask_blur)
        if r.clip_skip != 1:
            p["Clip skip"] = str(r.clip_skip)
        return p


def with_seeds(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``-n`` images of one request: seeds seed, seed+1, ... as A1111 numbers them."""
    return [replace(request, seed=request.seed + i) for i in range(n)]

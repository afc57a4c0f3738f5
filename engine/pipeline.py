"""txt2img, img2img and inpainting over a batch of requests: the engine's public entry point.

Callers (the CLI, the campaign flows) hand over any list of :class:`GenerationRequest`; the pipeline groups
the ones that can share a U-Net batch (same size, steps, sampler, mode), runs each group with classifier-free
guidance (cond and uncond in one batch), and returns one :class:`GenerationResult` per request, in order.

Reproducibility: each image gets its own CPU generator seeded with its seed; its initial noise and every
ancestral noise draw come from that generator in float32, then move to the device. The same seed therefore
gives the same image whatever the batch size, the position in the batch, or ``-n``.

Big img2img passes (above :data:`engine.tiling.AUTO_TILE_PIXELS`), and any request that sets ``tile``,
are denoised and VAE-coded in overlapping tiles blended with feathered seams, so memory follows the tile, not
the image; the noise is still drawn for the whole latent from the image's generator, so tiling never changes
which noise a seed gives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import ClassVar

import torch

from engine.adapters.embeddings import ModelEmbedding, encoder_widths, read_model_embedding
from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import LoraUse
from engine.conditioning import PromptEncoder, SDXLPromptEncoder
from engine.control_steps import ControlNetCache, ControlSteps, Residuals
from engine.devices import free_device_memory, resolve_device, resolve_dtype, set_cpu_threads
from engine.fast_steps import FastSteps
from engine.image_ops import fit_image, latent_mask, mask_to_tensor, pil_to_tensor01, tensor01_to_pil
from engine.loading import LoadedModels, load_checkpoint
from engine.render_parameters import render_parameters
from engine.request_limits import DeviceBudget
from engine.requests import GenerationRequest, GenerationResult, with_seeds
from engine.samplers import SamplerSpec, sample, sampler_sigmas
from engine.schedule import DiscreteSchedule
from engine.text_encoder import SD1_ENCODING, SD2_ENCODING
from engine.tiling import Region, resolve_tile, run_tiled
from engine.unet import sdxl_size_embedding

__all__ = ["GenerationRequest", "GenerationResult", "Pipeline", "ProgressFn", "with_seeds"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (steps done, steps total) across the whole generate() call
# Tiles of a tiled request overlap by a quarter of the tile for the denoiser (its attention sees the whole tile, so
# neighbours need room to agree) and by this many pixels for the VAE.
VAE_TILE_OVERLAP = 64


class Pipeline:
    """A checkpoint loaded once and kept warm across many ``generate`` calls."""

    # Matrix kernels (MKL on the CPU) pick their blocking by matrix size, so a row's result can change in the last
    # bits with the number of rows beside it; over a sampler's steps that shows in the pixels. On these device types
    # the networks therefore see one image at a time (its cond/uncond pair together, as a batch of one has it): the
    # same seed gives the same bytes whatever the batch. GPUs keep whole batches, for throughput.
    BATCH_INVARIANT_DEVICES: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def __init__(self, models: LoadedModels, *, max_batch_size: int = 8, schedule: DiscreteSchedule | None = None):
        self.models = models
        self.device = models.device
        self.dtype = models.dtype
        self.max_batch_size = max(1, max_batch_size)
        self.fits: int | None = None  # images per engine call that fit the device; None: no out-of-memory seen
        self.oom_halvings = 0
        self.batch_invariant = self.device.type in self.BATCH_INVARIANT_DEVICES
        self.schedule = schedule or DiscreteSchedule.sd1()
        self.prompts = _prompt_encoder(models, self.device, self.dtype)
        self._merger: LoraMerger | None = None
        # The SDXL refiner that finishes requests with a ``refiner_switch`` (A1111's "Refiner"), if one is attached.
        self.refiner: Pipeline | None = None
        self._embeddings: dict[tuple[str, str | None], ModelEmbedding] = {}
        self.latent_channels = models.vae.config.z_channels
        self.vae_factor = models.vae.config.downscale_factor
        self.controlnets = ControlNetCache(models, self.vae_factor)  # each ControlNet file loaded once

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
        prediction: str | None = None,
    ) -> "Pipeline":
        """``prediction`` ("eps" / "v") overrides what the file says or the family's rule decides (SD 2.x). On the CPU,
        torch gets the free cores' worth of threads unless the environment says otherwise (engine.devices)."""
        dev = resolve_device(device)
        if dev.type == "cpu":
            set_cpu_threads()
        models = load_checkpoint(checkpoint, vae_path=vae, device=dev, dtype=resolve_dtype(dtype, dev), allow_pickle=allow_pickle,
                                 prediction=prediction)
        return cls(models, max_batch_size=max_batch_size)

    # ---- public -------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest], progress: ProgressFn | None = None) -> list[GenerationResult]:
        budget = DeviceBudget.for_models(self.models)
        samplers = [r.validate(budget) for r in requests]
        for r in requests:
            self.fast_steps(r)  # a cache branch deeper than this U-Net is refused before anything renders
        groups: dict[tuple, list[int]] = {}
        for i, (r, sampler) in enumerate(zip(requests, samplers)):
            groups.setdefault(r.batch_key(sampler), []).append(i)
        # Each batch with the sampler its requests share (it is part of their key). Batches of one LoRA set run
        # together, the set already merged first, so each set is merged once per call.
        first_use: dict[tuple, int] = {}
        for i, r in enumerate(requests):
            first_use.setdefault(r.lora_key, i)
        active = self.active_lora_key
        ordered = sorted(groups.values(), key=lambda idx: (requests[idx[0]].lora_key != active,
                                                           first_use[requests[idx[0]].lora_key]))
        batches = [(samplers[idx[0]], idx[j : j + self.max_batch_size])
                   for idx in ordered for j in range(0, len(idx), self.max_batch_size)]
        total = sum(self._steps_run(requests[b[0]], sampler) for sampler, b in batches)
        done = 0

        def step(_: int, __: int) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        results: list[GenerationResult | None] = [None] * len(requests)
        for sampler, batch in batches:
            for i, result in zip(batch, self._run_fitting([requests[i] for i in batch], sampler, step)):
                results[i] = result
        return [r for r in results if r is not None]

    def _run_fitting(self, reqs: list[GenerationRequest], sampler: SamplerSpec, on_step: ProgressFn) -> list[GenerationResult]:
        """``reqs`` in as few engine calls as fit the device: on out-of-memory, free what the failed call held,
        halve the images per call and go on. What fits is remembered for this pipeline, so later batches don't hit
        the same wall first. A single image that does not fit is the caller's error. Results do not depend on the
        split: every image has its own seeded generator."""
        results: list[GenerationResult] = []
        i = 0
        while i < len(reqs):
            size = min(self.fits or len(reqs), len(reqs) - i)
            try:
                results.extend(self._run_batch(reqs[i : i + size], sampler, on_step))
                i += size
                continue
            except torch.OutOfMemoryError as exc:
                if size == 1:
                    raise
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # Retry outside the except block: the exception's traceback holds the failed call's frames and, through
            # them, its tensors; only once it is gone can the memory be returned.
            free_device_memory(self.device)
            self.fits = max(1, size // 2)
            self.oom_halvings += 1
            log.warning("out of memory on %s rendering %d image(s) in one call (%s); halving to %d and retrying",
                        self.device, size, message, self.fits)
        return results

    # ---- adapters -----------------------------------------------------------------------------------------

    @property
    def active_lora_key(self) -> tuple:
        return () if self._merger is None else tuple(use.key for use in self._merger.active)

    def use_loras(self, loras: Sequence[LoraUse]) -> None:
        """Merge ``loras`` into the warm model (nothing to do if they are what is merged now). Another set first
        returns the touched weights exactly to the checkpoint's; ``()`` leaves the base model."""
        if tuple(use.key for use in loras) == self.active_lora_key:
            return
        if self._merger is None:
            self._merger = LoraMerger(self.models)
        try:
            self._merger.activate(tuple(loras))
        finally:
            self.prompts.clear_cache()  # the text encoder may have changed: its cached empty chunk with it

    def _embedding_map(self, r: GenerationRequest) -> dict[str, ModelEmbedding] | None:
        """Prompt name -> its embedding: an Embedding for one-encoder models, {"clip_l": .., "clip_g": ..} for SDXL."""
        if not r.embeddings:
            return None
        widths = encoder_widths(self.models)
        out: dict[str, ModelEmbedding] = {}
        for file in r.embeddings:
            key = (os.path.abspath(file.path), file.sha256)
            if key not in self._embeddings:
                if len(self._embeddings) >= 256:  # a long-lived worker sees many briefs: keep the cache bounded
                    self._embeddings.pop(next(iter(self._embeddings)))
                self._embeddings[key] = read_model_embedding(file, widths)
            out[file.name] = self._embeddings[key]
        return out

    # ---- internals ----------------------------------------------------------------------------------------

    def _sigmas(self, req: GenerationRequest, sampler: SamplerSpec) -> torch.Tensor:
        sigmas = sampler_sigmas(sampler, self.schedule, req.steps)
        if not req.has_init:
            return sigmas
        # img2img runs the last int(steps * strength) steps of the full schedule (at least one).
        run = max(1, min(req.steps, int(req.steps * req.strength)))
        return sigmas[req.steps - run :]

    def _steps_run(self, req: GenerationRequest, sampler: SamplerSpec) -> int:
        return len(self._sigmas(req, sampler)) - 1

    def _initial_noise(self, gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(self.device)

    def tile_size(self, req: GenerationRequest) -> int | None:
        """The pixel tile size ``req`` runs with (None: untiled); automatic tiles are the model's native size.
        Only passes over an init image or latent (the hires fix's second pass) tile by themselves: tiling a
        txt2img render would compose each tile on its own, so there it is only done when ``tile`` asks for it."""
        if req.tile is None and not req.has_init:
            return None
        return resolve_tile(req.tile, req.width * req.height, max(64, self.models.native_size // 8 * 8))

    @torch.inference_mode()
    def _run_batch(self, reqs: list[GenerationRequest], sampler: SamplerSpec, on_step: ProgressFn) -> list[GenerationResult]:
        first = reqs[0]
        b = len(reqs)
        lh, lw = first.height // self.vae_factor, first.width // self.vae_factor
        shape = (self.latent_channels, lh, lw)
        gens = [torch.Generator("cpu").manual_seed(r.seed) for r in reqs]
        noise = self._initial_noise(gens, shape)
        sigmas = self._sigmas(first, sampler)
        tile = self.tile_size(first)

        self.use_loras(first.loras)
        cond, y = self._conditioning(reqs)
        cfg = torch.tensor([r.cfg_scale for r in reqs], dtype=torch.float32, device=self.device)

        init_latent = repaint = pixel_mask = init_pixels = concat = None
        if first.init_image is not None:
            init_pixels = torch.stack([pil_to_tensor01(fit_image(r.init_image, (r.width, r.height))) for r in reqs]).to(self.device)
            init_latent = self._encode(init_pixels, tile)
        elif first.init_latent is not None:
            for r in reqs:
                if tuple(r.init_latent.shape) != shape:  # type: ignore[union-attr]
                    raise ValueError(f"init latent of seed {r.seed} has shape {tuple(r.init_latent.shape)}, "  # type: ignore[union-attr]
                                     f"expected {shape} for {r.width}x{r.height}")
            init_latent = torch.stack([r.init_latent.float().cpu() for r in reqs]).to(self.device)  # type: ignore[union-attr]
        if first.mask is not None:
            size = (first.width, first.height)
            pixel_mask = torch.stack([mask_to_tensor(r.mask, size, r.mask_blur) for r in reqs]).to(self.device)  # type: ignore[arg-type]
            repaint = latent_mask(pixel_mask, self.vae_factor)
        if self.models.is_inpainting:
            concat = self._inpaint_concat(init_pixels, pixel_mask, b, (first.height, first.width), tile)

        x = noise * sigmas[0] if init_latent is None else init_latent + noise * sigmas[0]
        denoiser = self._denoiser(cond, cfg, concat, init_latent if not self.models.is_inpainting else None, repaint, y,
                                  self.controlnets.steps(first, sigmas), self.fast_steps(first))
        if tile is not None:
            denoiser = self._tiled_denoiser(denoiser, tile)
        noise_fn = (lambda i: self._initial_noise(gens, shape)) if sampler.ancestral else None
        refining = first.refiner_switch is not None
        k = base_steps(self.schedule, sigmas, first.refiner_switch) if refining else len(sigmas) - 1
        latents = sample(sampler, denoiser, x, sigmas[: k + 1], noise_fn=noise_fn, callback=on_step)
        decoder: Pipeline = self
        if refining and k < len(sigmas) - 1:
            decoder = self._refiner_for(first)
            latents = decoder.continue_sampling(reqs, sampler, latents, sigmas[k:], noise_fn, on_step)

        images = decoder._decode(latents, tile)
        if pixel_mask is not None and init_pixels is not None:
            # Keep the unmasked pixels exactly as given: the VAE round trip alone would soften them.
            images = init_pixels * (1 - pixel_mask) + images * pixel_mask
        kept = latents.detach().float().cpu()
        return [
            GenerationResult(request=r, image=tensor01_to_pil(img), parameters=render_parameters(self.models, r, sampler, self.refiner, self.controlnets), latents=kept[i])
            for i, (r, img) in enumerate(zip(reqs, images))
        ]

    def _refiner_for(self, r: GenerationRequest) -> "Pipeline":
        if self.refiner is None:
            raise ValueError("the request asks for a refiner switch but no refiner model is loaded (--refiner FILE)")
        return self.refiner

    @torch.inference_mode()
    def continue_sampling(self, reqs: list[GenerationRequest], sampler: SamplerSpec, latents: torch.Tensor,
                          sigmas: torch.Tensor, noise_fn: Callable[[int], torch.Tensor] | None,
                          on_step: ProgressFn) -> torch.Tensor:
        """Go on sampling ``latents`` (at ``sigmas[0]``) down ``sigmas`` with this model and its own conditioning:
        the SDXL refiner's part of a base + refiner render. The sampler starts afresh (a multistep sampler's history
        belongs to the other model), and ancestral noise keeps coming from the same per-image generators. The
        requests' ``refiner_loras`` are merged into this model for it (they share a batch key, so the first's hold)."""
        self.use_loras(reqs[0].refiner_loras)
        cond, y = self._conditioning(reqs)
        cfg = torch.tensor([r.cfg_scale for r in reqs], dtype=torch.float32, device=self.device)
        denoiser = self._denoiser(cond, cfg, None, None, None, y, fast=self.fast_steps(reqs[0]))
        return sample(sampler, denoiser, latents.to(self.device), sigmas, noise_fn=noise_fn, callback=on_step)

    def fast_steps(self, r: GenerationRequest) -> FastSteps | None:
        """A fresh fast-mode state for one sampling run of this model, or None when ``r`` asks for none."""
        return FastSteps(r.fast, len(self.models.unet.input_blocks)) if r.fast.enabled else None

    def compile_unet(self, mode: str | None = None) -> None:
        """``torch.compile`` the U-Net's forward in place (the first call of each new shape pays the compile). The
        module and its parameters stay the same objects, so LoRA merges keep working on the compiled model."""
        unet = self.models.unet
        if getattr(unet, "compiled", False):
            return
        unet.forward = torch.compile(unet.forward, mode=mode, dynamic=False)  # type: ignore[method-assign]
        unet.compiled = True  # type: ignore[assignment]

    def _tiled_denoiser(self, denoise: Callable[..., torch.Tensor], tile: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The denoiser run over overlapping latent tiles at every step, blended with feathered seams."""
        lt = tile // self.vae_factor
        overlap = max(1, lt // 4)

        def run(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return run_tiled(x, lambda part, region: denoise(part, sigma, region), tile=lt, overlap=overlap)

        return run

    def _conditioning(self, reqs: list[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(2B, tokens, hidden): cond rows then uncond rows, all padded to one token length; and for SDXL the
        U-Net's ``y`` rows: the pooled text embedding, then the size conditioning (original size = target size =
        the request's, no crop), as A1111 and diffusers set it by default."""
        texts = [r.prompt for r in reqs] + [r.negative_prompt for r in reqs]
        embeddings = [self._embedding_map(r) for r in reqs]
        skips = [r.clip_skip for r in reqs] * 2
        if not isinstance(self.prompts, SDXLPromptEncoder):
            return self.prompts.encode_batch(texts, skips, embeddings * 2), None  # type: ignore[arg-type]
        context, pooled = self.prompts.encode_batch(texts, skips, embeddings * 2)  # type: ignore[arg-type]
        if self.models.family.name == "sdxl-refiner":  # (original size, crop, aesthetic score: 6 cond, 2.5 uncond)
            sizes = torch.tensor([[r.height, r.width, 0, 0, score] for score in (REFINER_AESTHETIC, REFINER_NEGATIVE_AESTHETIC)
                                  for r in reqs], dtype=torch.float32)
        else:
            sizes = torch.tensor([[r.height, r.width, 0, 0, r.height, r.width] for r in reqs] * 2, dtype=torch.float32)
        y = torch.cat([pooled.float(), sdxl_size_embedding(sizes).to(pooled.device)], dim=-1)
        return context, y

    def _denoiser(
        self,
        cond: torch.Tensor,
        cfg: torch.Tensor,
        concat: torch.Tensor | None,
        init_latent: torch.Tensor | None,
        repaint: torch.Tensor | None,
        y: torch.Tensor | None = None,
        control: ControlSteps | None = None,
        fast: FastSteps | None = None,
    ) -> Callable[..., torch.Tensor]:
        """D(x, sigma[, region]); ``region`` (latent top, bottom, left, right) says which part of the image ``x``
        is when the denoiser runs on a tile, so the inpainting inputs are cut to match."""
        schedule = self.schedule
        v_prediction = self.models.prediction == "v"
        b = cfg.shape[0]
        # cfg 1 means "cond only": skip the uncond half of the batch entirely.
        use_uncond = bool((cfg != 1.0).any())
        context = cond if use_uncond else cond[:b]
        y_in = None if y is None else (y if use_uncond else y[:b])
        reps = 2 if use_uncond else 1
        concat_in = None if concat is None else concat.repeat(reps, 1, 1, 1).to(self.dtype)

        def cut(t: torch.Tensor | None, region: Region | None) -> torch.Tensor | None:
            return t if t is None or region is None else t[:, :, region[0]:region[1], region[2]:region[3]]

        def denoise(x: torch.Tensor, sigma: torch.Tensor, region: Region | None = None) -> torch.Tensor:
            c_in = (1.0 / (sigma**2 + 1.0).sqrt())[:, None, None, None]
            t = schedule.sigma_to_t(sigma.double().cpu()).to(device=x.device, dtype=torch.float32)
            x_in = (x * c_in).repeat(reps, 1, 1, 1)
            if concat_in is not None:
                x_in = torch.cat([x_in.to(self.dtype), cut(concat_in, region)], dim=1)
            if fast is not None:
                fast.step(sigma)
            out = self._unet_rows(x_in, t.repeat(reps), context, reps, y_in, None if control is None else control.at(sigma),
                                  fast, region)
            if use_uncond:  # guidance on the model's output, eps or v alike (it is linear in both)
                out_c, out_u = out.chunk(2)
                out = out_u + cfg[:, None, None, None] * (out_c - out_u)
            s = sigma[:, None, None, None]
            if v_prediction:
                # v = alpha * eps - sigma_t * x0 in the model's (unit-variance) scaling; as a denoiser that is
                # D = x / (s^2 + 1) - v * s / sqrt(s^2 + 1).
                denoised = x / (s**2 + 1.0) - out * (s / (s**2 + 1.0).sqrt())
            else:
                denoised = x - s * out
            if repaint is not None and init_latent is not None:
                # Regular (4-channel) models inpaint by pinning the kept area to the init image's latent.
                keep, paint = cut(init_latent, region), cut(repaint, region)
                denoised = keep * (1 - paint) + denoised * paint
            return denoised

        return denoise

    def _unet_rows(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, reps: int,
                   y: torch.Tensor | None = None, control: Residuals | None = None, fast: FastSteps | None = None,
                   region: Region | None = None) -> torch.Tensor:
        """The U-Net on ``reps`` stacked copies of a batch of images (cond rows, then uncond rows); with
        :attr:`batch_invariant`, one image's rows per call. ``control`` gives the ControlNet residuals of those rows;
        ``fast`` the fast mode's state, whose kept features belong to the rows and ``region`` of each call."""
        unet = self.models.unet

        def run(x: torch.Tensor, tt: torch.Tensor, c: torch.Tensor, yy: torch.Tensor | None, image: int | None) -> torch.Tensor:
            residuals = None if control is None else control(x, tt, c, yy)
            if fast is None:
                return unet(x, tt, c, yy, residuals).float()
            call = fast.call((image, region))
            out = unet(x, tt, c, yy, residuals, call).float()
            fast.done((image, region), call)
            return out

        b = x_in.shape[0] // reps
        if not self.batch_invariant or b == 1:
            return run(x_in, t, context, y, None)
        per_image = [run(x_in[rows], t[rows], context[rows], None if y is None else y[rows], i)
                     for i, rows in enumerate([i + k * b for k in range(reps)] for i in range(b))]
        return torch.cat([part[k : k + 1] for k in range(reps) for part in per_image])

    def _per_image(self, run: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        if not self.batch_invariant or batch.shape[0] == 1:
            return run(batch)
        return torch.cat([run(batch[i : i + 1]) for i in range(batch.shape[0])])

    def _inpaint_concat(
        self, init_pixels: torch.Tensor | None, pixel_mask: torch.Tensor | None, b: int, hw: tuple[int, int],
        tile: int | None = None,
    ) -> torch.Tensor:
        """The 5 extra input channels of a 9-channel inpainting U-Net: mask, then the masked image's latent.

        With no mask (txt2img on an inpainting model) everything is "to repaint" over a blank image."""
        if pixel_mask is None:
            mask = torch.ones(b, 1, *hw, device=self.device)
        else:
            mask = (pixel_mask > 0.5).float()
        base = init_pixels if init_pixels is not None else torch.full((b, 3, *hw), 0.5, device=self.device)
        masked = base * (1 - mask) + 0.5 * mask  # masked area set to mid-grey (0 in [-1, 1] pixel space)
        masked_latent = self._encode(masked, tile)
        return torch.cat([latent_mask(mask, self.vae_factor), masked_latent], dim=1)

    def _vae_overlap(self, tile: int) -> int:
        """Pixels shared by neighbouring VAE tiles: VAE_TILE_OVERLAP, or a quarter of a small tile (whole latents)."""
        f = self.vae_factor
        return max(f, min(VAE_TILE_OVERLAP, tile // 4) // f * f)

    def _encode(self, pixels01: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        if tile is not None:
            f = self.vae_factor
            return run_tiled(pixels01, lambda part, _: self._encode(part), tile=tile, overlap=self._vae_overlap(tile),
                             scale=Fraction(1, f), align=f, balance=True)
        return self._per_image(lambda px: self.models.vae.encode_latents(px.to(self.dtype)).float(), pixels01)

    def _decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        if tile is not None:
            f = self.vae_factor
            return run_tiled(latents, lambda part, _: self._decode(part), tile=tile // f,
                             overlap=self._vae_overlap(tile) // f, scale=f, balance=True)
        vae = self.models.vae
        images = self._per_image(lambda z: vae.decode_latents(z.to(vae.dtype)).float(), latents)
        if not torch.isfinite(images).all() and vae.dtype != torch.float32:
            # SD 1.x VAEs overflow in float16 on some images; redo that decode in float32, like A1111.
            log.warning("VAE produced NaNs in %s; decoding in float32 from now on", vae.dtype)
            self.models.vae = vae.float()
            images = self._per_image(lambda z: self.models.vae.decode_latents(z.float()).float(), latents)
        return images

# diffusers' and A1111's defaults for the refiner's aesthetic-score conditioning.
REFINER_AESTHETIC, REFINER_NEGATIVE_AESTHETIC = 6.0, 2.5


def base_steps(schedule: DiscreteSchedule, sigmas: torch.Tensor, switch: float | None) -> int:
    """How many of ``sigmas``' steps the base model runs before the refiner takes over at ``switch`` (a share of
    the training schedule, as diffusers' ``denoising_end``): the steps whose timestep is at least
    round(1000 * (1 - switch))."""
    if switch is None:
        return len(sigmas) - 1
    cutoff = round(schedule.num_train_timesteps * (1.0 - switch))
    ts = schedule.sigma_to_t(sigmas[:-1].double().cpu())
    return int((ts >= cutoff - 1e-6).sum())


def _prompt_encoder(models: LoadedModels, device: torch.device, dtype: torch.dtype) -> PromptEncoder | SDXLPromptEncoder:
    """The family's way from prompt to conditioning: SD 1.x's last CLIP layer, SD 2.x's penultimate OpenCLIP layer,
    SDXL's two encoders side by side with the pooled bigG output."""
    if models.family.name == "sdxl-refiner":
        return SDXLPromptEncoder.refiner(models.text_encoder, models.tokenizer, device, dtype)  # type: ignore[arg-type]
    if models.text_encoder_2 is not None:
        return SDXLPromptEncoder.base(models.text_encoder, models.text_encoder_2, models.tokenizer, device, dtype)  # type: ignore[arg-type]
    encoding = SD2_ENCODING if "openclip-h" in models.family.text_encoders else SD1_ENCODING
    return PromptEncoder(models.text_encoder, models.tokenizer, device, dtype, encoding=encoding)

"""What one image is asked to be (:class:`GenerationRequest`) and what comes back (:class:`GenerationResult`).

Kept apart from :mod:`engine.pipeline` so that callers which only build requests read them in one place; the
pipeline re-exports both.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from PIL import Image

from engine.adapters.infotext import check_lora_tags
from engine.adapters.refs import AdapterFile, LoraUse
from engine.fast_modes import FAST_OFF, FastMode
from engine.request_limits import DeviceBudget, check_seeds, check_size
from engine.sampler_names import SamplerSpec, get_sampler
from engine.tiling import AUTO_TILE_PIXELS

__all__ = ["ControlUse", "GenerationRequest", "GenerationResult", "with_seeds"]


@dataclass(frozen=True)
class ControlUse:
    """A ControlNet steering a request: the model file, its control image (already preprocessed: an edge map, a depth
    map ...; RGB, resized to the request's size by the pipeline if it is not), the preprocessor's name (for the
    infotext), and how much and when: ``strength`` multiplies its residuals; ``start`` / ``end`` are the share of the
    sampling steps during which it acts (A1111's Guidance Start / End, diffusers' control_guidance_start / end)."""

    model: AdapterFile
    image: Image.Image
    kind: str = "none"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    @cached_property
    def image_sha256(self) -> str:
        """The control image's identity (its pixels and size): requests share a batch only with the same image."""
        rgb = self.image.convert("RGB")
        return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()

    @property
    def key(self) -> tuple:
        return (self.model.sha256 or os.path.abspath(self.model.path), self.strength, self.start, self.end,
                self.image_sha256)

    def validate(self) -> None:
        if not self.strength >= 0:
            raise ValueError(f"ControlNet {self.model.name}: strength must be >= 0, got {self.strength}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"ControlNet {self.model.name}: guidance start/end must satisfy 0 <= start < end <= 1, "
                             f"got {self.start}, {self.end}")


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
    # img2img from a latent (C, H/8, W/8) instead of an image: the hires fix's latent upscale.
    init_latent: torch.Tensor | None = None
    # Tile size in pixels for denoising and the VAE: None = tile only above AUTO_TILE_PIXELS, 0 = never.
    tile: int | None = None
    # LoRAs merged into the model for this request, and the embedding files its prompts may use by name. The prompt
    # keeps its ``<lora:name:w>`` tags (they go into the infotext as A1111 writes it, never to the text encoder);
    # every tag must name one of ``loras`` at the same strengths (engine.adapters.library resolves them).
    loras: tuple[LoraUse, ...] = ()
    embeddings: tuple[AdapterFile, ...] = ()
    # SDXL base + refiner: the share of the schedule the base runs before the pipeline's refiner finishes it (A1111's
    # "Refiner switch at", diffusers' denoising_end); None = no refiner.
    refiner_switch: float | None = None
    # LoRAs merged into the refiner for its part (files made for the SDXL refiner; a base LoRA does not fit it).
    refiner_loras: tuple[LoraUse, ...] = ()
    # ControlNets steering the base model's steps (their residuals summed); none on the refiner's part.
    controls: tuple[ControlUse, ...] = ()
    # Less work per image for slightly different pixels (engine.fast_modes): feature reuse across steps, token
    # merging. Off by default; recorded in the infotext as "Fast".
    fast: FastMode = FAST_OFF

    def __post_init__(self) -> None:
        if not isinstance(self.fast, FastMode):  # records carry the text form ("cache:3,tome:0.5")
            object.__setattr__(self, "fast", FastMode.parse(self.fast))

    @property
    def mode(self) -> str:
        if self.init_image is None and self.init_latent is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    @property
    def lora_key(self) -> tuple:
        """What decides the merged weights: requests with different keys cannot share a U-Net batch."""
        return tuple(use.key for use in self.loras)

    @property
    def has_init(self) -> bool:
        return self.init_image is not None or self.init_latent is not None

    @property
    def tiled(self) -> bool:
        """Whether the pipeline runs this request in tiles (see :meth:`Pipeline.tile_size`)."""
        if self.tile is not None:
            return self.tile > 0
        return self.has_init and self.width * self.height > AUTO_TILE_PIXELS

    def validate(self, budget: DeviceBudget | None = None) -> SamplerSpec:
        """Check the request (RequestError names the field); returns its sampler, resolved from the name here and
        nowhere else. With ``budget``, also refuse a size one image of which cannot fit the device."""
        check_seeds(self.seed)
        check_size(self.width, self.height, tiled=self.tiled)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg scale must be >= 0, got {self.cfg_scale}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init image to inpaint")
        if self.init_latent is not None and self.init_image is not None:
            raise ValueError("give an init image or an init latent, not both")
        if self.tile is not None and (self.tile < 0 or (self.tile and (self.tile < 64 or self.tile % 8))):
            raise ValueError(f"tile must be 0 (never tile) or a multiple of 8 of at least 64, got {self.tile}")
        if self.refiner_switch is not None and not 0.0 < self.refiner_switch <= 1.0:
            raise ValueError(f"refiner switch must be in (0, 1], got {self.refiner_switch}")
        if self.refiner_loras and self.refiner_switch is None:
            raise ValueError("refiner LoRAs need a refiner switch (no refiner pass, nothing to merge them into)")
        if self.refiner_switch is not None and self.has_init:
            raise ValueError("a refiner pass goes with txt2img only (the refiner is for finishing a base render)")
        for control in self.controls:
            control.validate()
        if self.controls and self.tiled:
            raise ValueError("ControlNets do not work with tiled denoising yet: render untiled (tile=0) or smaller")
        sampler = get_sampler(self.sampler)
        check_lora_tags(self.prompt, self.negative_prompt, self.loras)
        if budget is not None:
            budget.check(self.width, self.height, tiled=self.tiled)
        return sampler

    def batch_key(self, sampler: SamplerSpec) -> tuple:
        """Requests with equal keys run in one U-Net batch; ``sampler`` is what :meth:`validate` resolved."""
        strength = self.strength if self.has_init else None
        return (self.width, self.height, self.steps, sampler, self.mode, strength, self.init_latent is not None, self.tile,
                self.lora_key, self.refiner_switch, tuple(use.key for use in self.refiner_loras),
                tuple(use.key for use in self.controls), self.fast)


@dataclass
class GenerationResult:
    request: GenerationRequest
    image: Image.Image
    # The generation settings in A1111 infotext order ("Steps", "Sampler", "CFG scale", "Seed", ...).
    parameters: dict[str, str] = field(default_factory=dict)
    # The final latent (C, H/8, W/8), float32 on the CPU: what a hires fix upscales in latent space.
    latents: torch.Tensor | None = None


def with_seeds(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``-n`` images of one request: seeds seed, seed+1, ... as A1111 numbers them; RequestError if the last one
    would pass :data:`SEED_MAX` (seeds never wrap)."""
    check_seeds(request.seed, n)
    return [replace(request, seed=request.seed + i) for i in range(n)]

"""Training a ControlNet for a loaded SD 1.x / SD 2.x base model on (image, control image, caption) triples.

The recipe is the one of the ControlNet paper (Zhang et al. 2023, lllyasviel's ``cldm.py``), on our own networks:

* the ControlNet is a copy of the base U-Net's encoder: ``time_embed``, ``input_blocks`` and ``middle_block`` start as
  the U-Net's weights, so from step 0 it reads the latent as the U-Net does; its ``zero_convs`` and
  ``middle_block_out`` start at zero, and the hint block is random with its last conv at zero, so at step 0 every
  residual is zero and the steered U-Net gives exactly the base model's output (training starts from the base model,
  never from a damaged one);
* the U-Net, VAE and text encoder are frozen; the ControlNet alone trains (AdamW, gradients clipped), with the usual
  diffusion loss through the frozen U-Net called with ``control=residuals`` (noise at uniform timesteps, MSE against
  eps or v per the model's prediction: :class:`engine.training.diffusion_step.DiffusionStep`);
* ``caption_dropout`` (the paper's 50 %) replaces that share of captions by "", so the control image alone has to
  carry what it shows and the ControlNet works with any prompt, or none;
* images are VAE-encoded once (the posterior mean times the latent scale) and captions encoded once, since nothing
  that makes them trains.

Resumable as the brand trainers are (:mod:`engine.training.run_state`): one CPU generator seeded with ``seed`` draws
everything (caption dropout, then timesteps, then noise, per step), the order samples come in is a pure function of
(seed, epoch), and the full state is saved atomically every ``save_every`` steps, so a killed run started again with
the same ``state_dir`` ends with the very weights an uninterrupted run ends with.

:func:`save_controlnet` writes the A1111 layout (``control_model.*``) in float16, which every ControlNet loader reads
(ours: :func:`engine.controlnet_loading.load_controlnet`), with the training settings and the base model's identity
and licence in the metadata. SDXL (its pooled and size conditioning) and inpainting models are refused for now.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from engine.checkpoint_writer import save_checkpoint
from engine.controlnet import ControlNetModel
from engine.image_ops import cover_fit, pil_to_tensor01
from engine.random_controlnet import controlnet_state_dict
from engine.training.caption_encoding import CaptionContexts
from engine.training.diffusion_step import (
    DiffusionStep, cuda_speedups, optimizer_step, planned_batches, refuse_unsupported_family, training_resolution,
    uncheckpoint_blocks,
)
from engine.training.run_state import RunState, claim_state_dir, config_fingerprint

__all__ = ["ControlNetTrainingConfig", "ControlNetTrainingResult", "ControlSample", "controlnet_from_unet",
           "controlnet_metadata", "save_controlnet", "train_controlnet"]

STATE_FILE = "controlnet-state.pt"
FINGERPRINT_FILE = "fingerprint.json"
# The U-Net modules a ControlNet copies (the rest of its modules are its own).
COPIED = ("time_embed", "label_emb", "input_blocks", "middle_block")


@dataclass(frozen=True)
class ControlSample:
    """One training example: the image, its control image (an edge map, a sketch, a depth map ...: RGB, white
    marks on black as the preprocessors make them) and its caption. Both images are cover-fitted to the training
    resolution."""

    image: Image.Image
    control: Image.Image
    caption: str


@dataclass(frozen=True)
class ControlNetTrainingConfig:
    steps: int = 2000
    lr: float = 1e-4
    batch_size: int = 8
    resolution: int | None = None  # None: the model's native size
    seed: int = 0
    save_every: int = 200
    warmup_steps: int = 0  # linear warmup, then constant (the paper trains at a constant lr)
    caption_dropout: float = 0.5  # the paper's: half the captions "" so the control alone must carry the layout
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    noise_offset: float = 0.0
    clip_skip: int = 1
    mixed_precision: str = "no"  # "no" or "bf16"; CUDA only
    gradient_checkpointing: bool = False  # CUDA only: the frozen U-Net's blocks

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("steps, batch_size and save_every must be at least 1")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {self.mixed_precision!r}")


@dataclass
class ControlNetTrainingResult:
    model: ControlNetModel  # float32, on the models' device
    losses: list[float]  # per step, every run of a resumed training included
    steps: int
    resumed_from: int  # 0 for a fresh run
    resolution: int
    samples: int
    dataset_sha256: str
    started_at: float  # unix time of the first run's start
    finished_at: float
    seconds: float  # training time summed over all runs (caching excluded)
    fingerprint: str
    config: ControlNetTrainingConfig


def controlnet_from_unet(unet, seed: int = 0) -> ControlNetModel:
    """A fresh ControlNet for ``unet`` (float32, on the CPU): the U-Net's encoder weights copied, every residual
    path at zero, the hint block random (drawn from ``seed``) but for its last conv, which is zero."""
    cfg = unet.config
    with torch.random.fork_rng(devices=[]):
        # The hint block's init draws from torch's global generator: seeded here, left as it was afterwards.
        torch.manual_seed(seed)
        model = ControlNetModel(replace(cfg, out_channels=cfg.in_channels))
    own = model.state_dict()
    copied = {k: v.detach().float().cpu() for k, v in unet.state_dict().items() if k.split(".")[0] in COPIED}
    if set(copied) - set(own) or any(own[k].shape != v.shape for k, v in copied.items()):
        raise ValueError("the U-Net's encoder does not fit a ControlNet of its config")
    model.load_state_dict(copied, strict=False)
    zeroed = [*(z[0] for z in model.zero_convs), model.middle_block_out[0], model.input_hint_block[-1]]
    with torch.no_grad():
        for conv in zeroed:
            conv.weight.zero_()
            conv.bias.zero_()
    return model


def _lr_factor(config: ControlNetTrainingConfig) -> Callable[[int], float]:
    def factor(i: int) -> float:
        return (i + 1) / config.warmup_steps if i < config.warmup_steps else 1.0
    return factor


@torch.no_grad()
def _cache(models, samples: Sequence[ControlSample], resolution: int, chunk: int = 16
           ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(latents (N, C, h, w) float32 on the CPU, hints (N, 3, H, W) uint8, sha256 of the fitted pixels and captions).
    Hints stay 8-bit: a quarter of the memory, and exactly what an 8-bit control image gives the pipeline."""
    digest = hashlib.sha256(f"{resolution}:{len(samples)}".encode())
    latents, hints = [], []
    for start in range(0, len(samples), chunk):
        pixels = []
        for s in samples[start:start + chunk]:
            image = cover_fit(s.image.convert("RGB"), resolution, resolution)
            control = cover_fit(s.control.convert("RGB"), resolution, resolution)
            digest.update(image.tobytes() + control.tobytes() + s.caption.encode() + b"\0")
            pixels.append(pil_to_tensor01(image))
            hints.append(torch.from_numpy(np.array(control)).permute(2, 0, 1).contiguous())
        batch = torch.stack(pixels).to(models.device)
        latents.append(models.vae.encode_latents(batch).float().cpu())
    return torch.cat(latents), torch.stack(hints), digest.hexdigest()


def train_controlnet(
    models,
    samples: Sequence[ControlSample],
    config: ControlNetTrainingConfig,
    *,
    state_dir: str | os.PathLike[str],
    on_step: Callable[[int, int, float], None] | None = None,
) -> ControlNetTrainingResult:
    """Train a ControlNet for ``models`` (an :class:`engine.loading.LoadedModels`) on ``samples``.

    ``on_step(step, total, loss)`` after every step (step counts from 1). An exception from it stops the run like a
    kill: the last saved state stays and the next call with the same ``state_dir`` resumes from it."""
    config.check()
    refuse_unsupported_family(models, "ControlNet")
    if not samples:
        raise ValueError("no training samples")
    resolution, _ = training_resolution(models, config.resolution)
    latents, hints, dataset_sha = _cache(models, samples, resolution)
    identity = config_fingerprint(config, resolution=resolution, dataset=dataset_sha, base=models.checkpoint.sha256)
    claim_state_dir(Path(state_dir), FINGERPRINT_FILE, identity, {"config": asdict(config), "dataset": dataset_sha},
                    "ControlNet training (other settings, samples or base model)")

    for net in (models.unet, models.text_encoder, models.vae):
        net.requires_grad_(False)
    device = models.device
    model = controlnet_from_unet(models.unet, config.seed).to(device).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(config))
    gen = torch.Generator().manual_seed(config.seed)
    run = RunState(Path(state_dir) / STATE_FILE, identity, opt, sched, gen, lambda: {"controlnet": model.state_dict()})
    state = run.resume(map_location=device)
    if state is not None:
        model.load_state_dict(state["controlnet"])
        del state

    autocast, wrapped = cuda_speedups(models, config.mixed_precision, config.gradient_checkpointing)
    diffusion = DiffusionStep(models, gen, noise_offset=config.noise_offset, autocast=autocast)
    contexts = CaptionContexts(models, clip_skip=config.clip_skip, trains=False)
    everything = {(resolution, resolution): list(range(len(samples)))}  # one bucket: every sample is square
    dtype = models.dtype
    run.start_clock()
    try:
        for i, members in planned_batches(everything, config.batch_size, config.seed, run.first, config.steps):
            # Drawn before the noise (the shared draw order of engine.training.diffusion_step).
            drop = (torch.rand(len(members), generator=gen) < config.caption_dropout).tolist()
            captions = ["" if d else samples[m].caption for m, d in zip(members, drop)]
            x_t, t, target = diffusion.noised(latents[members].to(device))
            hint = hints[members].to(device).float() / 255.0
            with autocast:
                context = contexts(captions).to(dtype)
                residuals = model(x_t, hint, t.float(), context)
                pred = models.unet(x_t.to(dtype), t.float(), context, control=residuals)
            loss = F.mse_loss(pred.float(), target)
            optimizer_step(loss, opt, sched, params, config.max_grad_norm)
            run.end_step(i + 1, config.steps, loss.item(), save_every=config.save_every, sample_every=0,
                         on_step=on_step, on_sample=None)
    finally:
        uncheckpoint_blocks(wrapped)
    return ControlNetTrainingResult(
        model=model.eval(), losses=run.losses, steps=config.steps, resumed_from=run.first, resolution=resolution,
        samples=len(samples), dataset_sha256=dataset_sha, started_at=run.started_at, finished_at=time.time(),
        seconds=run.seconds(), fingerprint=identity, config=config,
    )


def _base_metadata(path: Path) -> dict[str, str]:
    """The base checkpoint's safetensors metadata; none for other formats (a pickle or a diffusers folder)."""
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def controlnet_metadata(models, result: ControlNetTrainingResult, extra: dict[str, str] | None = None
                        ) -> dict[str, str]:
    """What the file records: the training settings and outcome (``adforge.*``), the base model's sha256, and the
    base file's licence (a ControlNet is a derivative of the model whose encoder it copies)."""
    base = _base_metadata(Path(models.checkpoint.path))
    losses = result.losses
    if not all(math.isfinite(x) for x in losses[-1:]):
        raise ValueError("the training diverged (last loss not finite); nothing written")
    tail = losses[-min(len(losses), 100):]
    meta = {
        "adforge.kind": "controlnet",
        "adforge.training": json.dumps({**asdict(result.config), "resolution": result.resolution,
                                        "samples": result.samples}, sort_keys=True),
        "adforge.dataset_sha256": result.dataset_sha256,
        "adforge.base_model": models.checkpoint.name,
        "adforge.base_sha256": models.checkpoint.sha256,
        "adforge.steps": str(result.steps),
        "adforge.final_loss": f"{sum(tail) / len(tail):.6g}" if tail else "nan",
        "adforge.training_seconds": f"{result.seconds:.1f}",
        "modelspec.architecture": f"{base.get('modelspec.architecture', 'stable-diffusion')}/controlnet",
        "modelspec.resolution": f"{result.resolution}x{result.resolution}",
    }
    if "modelspec.license" in base:
        meta["modelspec.license"] = base["modelspec.license"]
    meta.update(extra or {})
    return meta


def save_controlnet(path: str | os.PathLike[str], model: ControlNetModel, metadata: dict[str, str] | None = None) -> str:
    """Write ``model`` as one safetensors file in the A1111 layout (``control_model.*``), float16, atomically."""
    return save_checkpoint(path, controlnet_state_dict(model, "ldm", torch.float16), metadata)

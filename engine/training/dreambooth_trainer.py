"""DreamBooth: the whole U-Net (optionally the text encoder) fine-tuned on a product, with prior preservation
(``adforge train dreambooth``), exported as a single-file checkpoint in the base family's real layout.

The recipe is diffusers' ``train_dreambooth.py`` / kohya's ``train_db.py`` on our own networks, sharing the LoRA
trainer's parts (:mod:`engine.training.lora_trainer`, :mod:`engine.training.diffusion_step`,
:mod:`engine.training.run_state`): buckets and cached posterior-mean latents, captions encoded as the pipeline
encodes prompts, one CPU generator for all randomness, an epoch plan that is a pure function of (seed, epoch), a
fingerprint that refuses a state folder of another training, eps or v targets, the resumable state.

* Class images ("a photo of a bottle") are rendered by the base model first (:mod:`engine.training.class_images`);
  each step trains on ``batch_size`` instance latents plus as many class latents, and
  loss = MSE(instance) + ``prior_loss_weight`` * MSE(class). ``prior_loss_weight`` 0 (or ``num_class_images`` 0)
  is plain fine-tuning and renders nothing.
* AdamW (weight decay 0.01) on every U-Net weight at ``lr`` 5e-6 (and the text encoder at ``text_lr``), gradients
  clipped to 1, constant or cosine learning rate after a linear warmup.
* The models are trained **in place**: ``models.unet`` becomes the fine-tuned U-Net (no second copy is kept).

Memory: the trainable weights are float32 (models must be loaded in float32; ``mixed_precision="bf16"`` autocasts the
forward on CUDA), AdamW keeps two more float32 tensors per weight, and the gradients one: SD 1.5's 860 M-parameter
U-Net needs ~3.4 GB weights + 3.4 GB gradients + 6.9 GB optimizer state, before activations (which
``gradient_checkpointing`` cuts, CUDA only). ``use_ema`` keeps another float32 copy. The resumable state file holds
weights + optimizer state (~10 GB for SD 1.5), written atomically every ``save_every`` steps: a killed run
started again with the same ``state_dir`` ends with the very weights an uninterrupted run ends with.

SD 1.x and SD 2.x (eps and v); SDXL and inpainting models are refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.checkpoint import UNET_PREFIX
from engine.checkpoint_writer import SafetensorsWriter, checkpoint_metadata, sd1_state_dict, sd2_state_dict
from engine.loading import META_NATIVE_SIZE
from engine.open_clip import SD2_PREFIX
from engine.pipeline import Pipeline
from engine.training.caption_encoding import CaptionContexts
from engine.training.class_images import render_class_images
from engine.training.diffusion_step import (
    DiffusionStep, bucket_images, cuda_speedups, optimizer_step, planned_batches, refuse_unsupported_family,
    training_resolution, uncheckpoint_blocks,
)
from engine.training.image_set import ImageSet
from engine.training.lora_trainer import cache_latents, lr_factor
from engine.training.run_state import RunState, claim_state_dir, config_fingerprint

STATE_FILE = "dreambooth-state.pt"
FINGERPRINT_FILE = "fingerprint.json"
# Set on a U-Net once an optimizer step has changed it: a fresh run on such models would not start from the base.
_TRAINED_MARK = "_adforge_dreambooth_trained"


@dataclass(frozen=True)
class DreamBoothConfig:
    class_word: str = ""  # "" : the image set's class word
    steps: int = 800
    lr: float = 5e-6  # U-Net
    text_lr: float = 5e-6  # text encoder, when train_text_encoder
    train_text_encoder: bool = False
    batch_size: int = 1  # instance images per step (as many class images come beside them)
    resolution: int | None = None  # None: the model's native size
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_prompt: str | None = None  # None: f"a photo of {class_word}"
    class_steps: int = 25  # sampler steps per class image
    class_cfg_scale: float = 7.0
    seed: int = 0
    save_every: int = 100
    sample_every: int = 0  # 0: never call on_sample
    lr_scheduler: str = "constant"  # "constant" or "cosine" (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_bucket_ratio: float = 2.0
    clip_skip: int = 1
    mixed_precision: str = "no"  # "no" or "bf16"; CUDA only
    gradient_checkpointing: bool = False  # CUDA only
    use_ema: bool = False
    ema_decay: float = 0.9999

    def prompt_for_class(self, class_word: str) -> str:
        return self.class_prompt or f"a photo of {self.class_word or class_word}"

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("steps, batch_size and save_every must be at least 1")
        if self.prior_loss_weight < 0 or self.num_class_images < 0:
            raise ValueError("prior_loss_weight and num_class_images must not be negative")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', not {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {self.mixed_precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")

    @property
    def uses_prior(self) -> bool:
        return self.prior_loss_weight > 0 and self.num_class_images > 0


@dataclass
class DreamBoothResult:
    unet: torch.nn.Module  # models.unet, trained in place
    text_encoder_trained: bool
    ema: dict[str, torch.Tensor] | None  # float32 EMA of the U-Net's weights (use_ema); export writes these
    losses: list[float]  # per step: instance + weight * prior, every run of a resumed training included
    instance_losses: list[float]
    prior_losses: list[float]  # empty without prior preservation
    steps: int
    resumed_from: int
    resolution: int
    config: DreamBoothConfig
    class_prompt: str
    class_images: list[Path]
    base_sha256: str
    image_set_sha256: str
    trigger: str
    class_word: str
    started_at: float
    finished_at: float
    seconds: float
    fingerprint: str
    extra: dict = field(default_factory=dict)


def refuse_unsupported(models) -> None:
    refuse_unsupported_family(models, "DreamBooth")
    if models.dtype != torch.float32:
        # AdamW steps of 5e-6 vanish in float16/bfloat16 weights; mixed_precision gives the speed instead.
        raise ValueError(f"load the base in float32 to fine-tune it (it is {models.dtype}); "
                         "use mixed_precision='bf16' on CUDA for speed")


def fingerprint(config: DreamBoothConfig, image_set: ImageSet, class_set_sha256: str | None, base_sha256: str,
                resolution: int) -> str:
    return config_fingerprint(config, resolution=resolution, image_set=image_set.sha256,
                              class_images=class_set_sha256, base=base_sha256)


def class_batch(n_class: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The class images of one step: every class image once per pass, in an order shuffled per pass; a pure function
    of (seed, step) like :func:`epoch_plan`, so a resumed run draws the same ones."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_class)
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7_777_777 + epoch)
        out.append(torch.randperm(n_class, generator=g)[pos].item())
    return out


def train_dreambooth(
    models,
    image_set: ImageSet,
    config: DreamBoothConfig,
    *,
    class_dir: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    on_step: Callable[[int, int, float], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> DreamBoothResult:
    """Fine-tune ``models`` (an :class:`engine.loading.LoadedModels` in float32) in place on ``image_set``.

    Class images go to (or are reused from) ``class_dir``; ``on_step(step, total, loss)`` after every step;
    ``on_sample(step)`` every ``sample_every`` steps (a Pipeline on the same models must ``prompts.clear_cache()``
    first when the text encoder trains). An exception from a callback stops the run like a kill: the last saved state
    stays and the next call resumes from it (on these models or freshly loaded ones)."""
    config.check()
    refuse_unsupported(models)
    device = models.device
    resolution, align = training_resolution(models, config.resolution)
    state_dir = Path(state_dir)
    state_path = state_dir / STATE_FILE
    if getattr(models.unet, _TRAINED_MARK, False) and not state_path.exists():
        raise ValueError("these models were already changed by a DreamBooth run and there is no saved state to resume "
                         "from: load the base model again")
    class_prompt = config.prompt_for_class(image_set.class_word)

    class_set = None
    if config.uses_prior:
        # Rendered by the unchanged base: on a resume the folder already holds them all (nothing is rendered).
        rendered = render_class_images(Pipeline(models), class_prompt, config.num_class_images, class_dir,
                                       size=resolution, steps=config.class_steps, seed=config.seed,
                                       cfg_scale=config.class_cfg_scale)
        class_set = rendered.image_set(size=resolution, class_word=image_set.class_word)
    identity = fingerprint(config, image_set, class_set.sha256 if class_set else None, models.checkpoint.sha256,
                           resolution)
    claim_state_dir(state_dir, FINGERPRINT_FILE, identity, {"config": asdict(config), "image_set": image_set.sha256},
                    "training (other settings, images, class images or base model)")

    assignment = bucket_images(image_set, resolution, align, config.max_bucket_ratio)
    latents = cache_latents(models, image_set, assignment)
    class_latents = (cache_latents(models, class_set, {(resolution, resolution): list(range(len(class_set.items)))})
                     if class_set else {})

    models.vae.requires_grad_(False)
    models.unet.requires_grad_(True)
    models.text_encoder.requires_grad_(config.train_text_encoder)
    groups = [{"params": [p for p in models.unet.parameters()], "lr": config.lr}]
    if config.train_text_encoder:
        groups.append({"params": [p for p in models.text_encoder.parameters()], "lr": config.text_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config))
    gen = torch.Generator().manual_seed(config.seed)
    ema = ({k: v.detach().float().clone() for k, v in models.unet.state_dict().items()} if config.use_ema else None)
    inst_losses: list[float] = []
    prior_losses: list[float] = []

    def own_state() -> dict:
        state = {"unet": models.unet.state_dict(), "instance": inst_losses, "prior": prior_losses}
        if config.train_text_encoder:
            state["text_encoder"] = models.text_encoder.state_dict()
        if ema is not None:
            state["ema"] = ema
        return state

    run = RunState(state_path, identity, opt, sched, gen, own_state)
    state = run.resume(map_location=device)
    if state is not None:
        models.unet.load_state_dict(state["unet"])
        if config.train_text_encoder:
            models.text_encoder.load_state_dict(state["text_encoder"])
        if ema is not None:
            ema = state["ema"]
        inst_losses, prior_losses = list(state["instance"]), list(state["prior"])
        del state

    autocast, wrapped = cuda_speedups(models, config.mixed_precision, config.gradient_checkpointing)
    diffusion = DiffusionStep(models, gen, autocast=autocast)
    context_for = CaptionContexts(models, clip_skip=config.clip_skip, trains=config.train_text_encoder)
    run.start_clock()

    def loss_of(x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-image MSE (B,) of the U-Net's prediction on noised ``x0``; noise and timesteps from ``gen``."""
        pred, target = diffusion.predict(x0, context_for, captions)
        return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))

    try:
        for i, members in planned_batches(assignment, config.batch_size, config.seed, run.first, config.steps):
            x_inst = torch.stack([latents[m] for m in members])
            captions = [image_set.items[m].caption for m in members]
            if class_set is not None:
                picked = class_batch(len(class_latents), len(members), config.seed, i)
                x_cls = torch.stack([class_latents[c] for c in picked])
                if x_cls.shape[1:] == x_inst.shape[1:]:  # one U-Net call for both halves, as diffusers does
                    per_image = loss_of(torch.cat([x_inst, x_cls]), captions + [class_prompt] * len(picked))
                    inst, prior = per_image[:len(members)].mean(), per_image[len(members):].mean()
                else:  # a non-square bucket: the two halves cannot share a batch
                    inst, prior = loss_of(x_inst, captions).mean(), loss_of(x_cls, [class_prompt] * len(picked)).mean()
                loss = inst + config.prior_loss_weight * prior
            else:
                inst = loss = loss_of(x_inst, captions).mean()
                prior = None
            optimizer_step(loss, opt, sched, params, 1.0)
            setattr(models.unet, _TRAINED_MARK, True)
            if ema is not None:
                with torch.no_grad():
                    for k, v in models.unet.state_dict().items():
                        if v.is_floating_point():
                            ema[k].lerp_(v.float(), 1 - config.ema_decay)
            inst_losses.append(inst.item())
            if prior is not None:
                prior_losses.append(prior.item())
            run.end_step(i + 1, config.steps, loss.item(), save_every=config.save_every,
                         sample_every=config.sample_every, on_step=on_step, on_sample=on_sample)
    finally:
        uncheckpoint_blocks(wrapped)
        opt.zero_grad(set_to_none=True)  # gradients are a U-Net's worth of memory
        models.unet.requires_grad_(False)
        models.text_encoder.requires_grad_(False)
    return DreamBoothResult(
        unet=models.unet, text_encoder_trained=config.train_text_encoder, ema=ema, losses=run.losses,
        instance_losses=inst_losses, prior_losses=prior_losses, steps=config.steps, resumed_from=run.first,
        resolution=resolution, config=config, class_prompt=class_prompt,
        class_images=[it.path for it in class_set.items] if class_set else [], base_sha256=models.checkpoint.sha256,
        image_set_sha256=image_set.sha256, trigger=image_set.trigger, class_word=image_set.class_word,
        started_at=run.started_at, finished_at=time.time(), seconds=run.seconds(),
        fingerprint=identity,
    )


# ---- export -------------------------------------------------------------------------------------------------

_MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v"}
_LICENCE_KEYS = ("adforge.licence", "modelspec.license")


def _base_metadata_and_projection(models) -> tuple[dict[str, str], torch.Tensor | None]:
    """The base file's metadata and (SD 2.x) its OpenCLIP text_projection, which our loader drops but real files
    carry; ({}, None) for a base that is not a safetensors file."""
    path = Path(models.checkpoint.path)
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return {}, None
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        key = SD2_PREFIX + "text_projection"
        projection = f.get_tensor(key).float() if key in f.keys() else None
    return meta, projection


def dreambooth_metadata(result: DreamBoothResult, models, base_meta: Mapping[str, str],
                        extra: Mapping[str, str] | None) -> dict[str, str]:
    meta = checkpoint_metadata(models.unet, [models.text_encoder], always_text_heads=models.family.name == "sd1")
    meta[META_NATIVE_SIZE] = str(models.native_size)
    meta["adforge.prediction"] = models.prediction
    meta["modelspec.sai_model_spec"] = "1.0.0"
    meta["modelspec.prediction_type"] = _MODELSPEC_PREDICTION[models.prediction]
    if "modelspec.architecture" in base_meta:
        meta["modelspec.architecture"] = base_meta["modelspec.architecture"]
    meta["modelspec.title"] = f"{result.trigger} {result.class_word} (DreamBooth)"
    meta["adforge.training"] = "dreambooth"
    meta["adforge.base_sha256"] = result.base_sha256
    meta["adforge.image_set_sha256"] = result.image_set_sha256
    meta["adforge.trigger"] = result.trigger
    meta["adforge.class_word"] = result.class_word
    meta["adforge.class_prompt"] = result.class_prompt
    meta["adforge.training_settings"] = json.dumps(
        {**asdict(result.config), "resolution": result.resolution, "steps_done": len(result.losses),
         "ema_exported": result.ema is not None}, sort_keys=True)
    for key in _LICENCE_KEYS:  # the fine-tune is a derivative of the base: its licence goes with it
        if base_meta.get(key):
            meta["adforge.licence"] = meta["modelspec.license"] = base_meta[key]
            break
    meta.update(extra or {})
    return meta


def export_dreambooth(
    path: str | os.PathLike[str],
    result: DreamBoothResult,
    models,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the fine-tuned model as one ``.safetensors`` checkpoint in the family's layout: the trained U-Net (its
    EMA weights with ``use_ema``), the text encoder (trained or the base's) and the base's VAE, in ``dtype``
    (float16 by default, float32 for further training). ``metadata`` adds to and overrides what is written.

    Streamed: the U-Net goes to the file one tensor at a time, converted as it is written, so no second copy of it
    is ever held; the text encoder and VAE (a fraction of the size) go through the family's state-dict function."""
    refuse_unsupported(models)
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise ValueError(f"export dtype must be float16, bfloat16 or float32, not {dtype}")
    base_meta, projection = _base_metadata_and_projection(models)
    empty = torch.nn.Module()  # stands in for the U-Net, which is streamed on its own
    if models.family.name.startswith("sd2"):
        rest = sd2_state_dict(empty, models.text_encoder, models.vae,  # type: ignore[arg-type]
                              text_projection=projection)
    else:
        rest = sd1_state_dict(empty, models.text_encoder, models.vae)  # type: ignore[arg-type]
    unet = result.ema if result.ema is not None else models.unet.state_dict()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")

    layout = {UNET_PREFIX + k: meta(v) for k, v in unet.items()} | {k: meta(v) for k, v in rest.items()}
    out = Path(path)
    with SafetensorsWriter(out, layout, dreambooth_metadata(result, models, base_meta, metadata)) as writer:
        for k, v in unet.items():
            writer.write(UNET_PREFIX + k, cast(v.detach()).cpu())
        for k, v in rest.items():
            writer.write(k, cast(v))
    return out

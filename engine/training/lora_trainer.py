"""Training a LoRA of a product on a loaded SD 1.x / SD 2.x / SDXL base model (``adforge train lora``).

The recipe is kohya's ``train_network.py`` with its usual defaults, on our own networks:

* images go to aspect buckets (:mod:`engine.training.buckets`) and are VAE-encoded once, to the posterior *mean*
  times the checkpoint's latent scale (deterministic, so a resumed run sees the same latents);
* every base weight is frozen; only the LoRA layers (:mod:`engine.training.lora_layers`) train, with AdamW
  (weight decay 0.01, torch's default betas), U-Net ``lr`` and text-encoder ``text_lr``, gradients clipped to 1;
* learning rate: ``warmup_steps`` of linear warmup, then constant (kohya's default) or cosine down to 0;
* timesteps uniform over the 1000 training steps of the SD schedule (SD 1.x and 2.x share it), x_t = sqrt(ac) x0 +
  sqrt(1-ac) eps, loss = MSE against eps, or against v = sqrt(ac) eps - sqrt(1-ac) x0 for v-prediction models
  (:mod:`engine.training.diffusion_step`, shared with the embedding and DreamBooth trainers);
* captions are encoded exactly as the pipeline encodes prompts (:mod:`engine.training.caption_encoding`);
  ``caption_dropout`` replaces that share of captions by "" (kohya's caption_dropout_rate).

All randomness comes from one CPU generator seeded with ``seed`` (noise drawn on the CPU, then moved, as the
pipeline does), and the order images are seen in is a pure function of (seed, epoch). The full state is saved
atomically every ``save_every`` steps (:mod:`engine.training.run_state`), so a killed run started again with the same
``state_dir`` ends with the very weights an uninterrupted run ends with; a different config or image set with that
``state_dir`` is refused.

``mixed_precision`` ("bf16") and ``gradient_checkpointing`` apply on CUDA and are ignored on the CPU (bf16 autocast
there is a speed gamble, and checkpointing saves memory a CPU run does not lack).

SDXL base (sd-scripts' ``sdxl_train_network.py`` recipe): the U-Net is conditioned as the pipeline conditions it
(:class:`engine.training.caption_encoding.SDXLConditioning`: CLIP-L ++ bigG penultimate context, pooled bigG and
the size embedding in ``y``), the LoRA targets both encoders (``lora_te1_`` CLIP-L, ``lora_te2_`` bigG) and the
U-Net in LDM names. The size rows are sd-scripts': original size = the photo's size before the bucket resize, crop
top-left = the offset of the bucket's crop in the resized photo, target size = the bucket. ``train_text_encoder``
None (the default) means the family's habit: on for SD 1.x / 2.x, *off* for SDXL, as sd-scripts users mostly
train SDXL (``--network_train_unet_only``: two big encoders double the memory and overfit a product quickly).
The refiner (no CLIP-L, aesthetic-score ``y``) and inpainting models are refused; the default resolution is the
model's native size, so a real SDXL file buckets at 1024-class sizes in kohya's 64 px steps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.adapters.lora_names import UNET
from engine.training.buckets import Bucket, cover_crop_box, fit_to_bucket
from engine.training.caption_encoding import CaptionContexts, SDXLConditioning
from engine.training.diffusion_step import (
    DiffusionStep, bucket_images, cuda_speedups, optimizer_step, planned_batches, refuse_unsupported_family,
    training_resolution, uncheckpoint_blocks,
)
from engine.training.image_set import ImageSet, open_image
from engine.training.lora_layers import LoraNetwork, find_targets
from engine.training.run_state import RunState, claim_state_dir, config_fingerprint

STATE_FILE = "lora-state.pt"
FINGERPRINT_FILE = "fingerprint.json"


@dataclass(frozen=True)
class LoraTrainingConfig:
    rank: int = 16
    # None: rank / 2 (a common kohya recipe: scale 0.5 keeps lr 1e-4 gentle); alpha == rank gives scale 1.
    alpha: float | None = None
    steps: int = 1000
    lr: float = 1e-4  # U-Net LoRA
    text_lr: float = 5e-5  # text-encoder LoRA (kohya's text_encoder_lr)
    batch_size: int = 1
    resolution: int | None = None  # None: the model's native size
    train_text_encoder: bool | None = None  # None: the family's default (SD 1.x / 2.x on, SDXL off)
    conv: bool = False  # LoCon: also the resnets' and samplers' 3x3 convs
    seed: int = 0
    save_every: int = 100
    sample_every: int = 0  # 0: never call on_sample
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    lr_scheduler: str = "constant"  # "constant" or "cosine" (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_bucket_ratio: float = 2.0
    clip_skip: int = 1
    mixed_precision: str = "no"  # "no" or "bf16"; CUDA only
    gradient_checkpointing: bool = False  # CUDA only
    # Pivotal tuning: > 0 makes the trigger an embedding of this many new vectors, trained with the LoRA (see
    # train_lora). 0: the trigger stays the tokenizer's own word.
    pivotal_vectors: int = 0
    pivotal_lr: float = 5e-3  # the vectors' lr (A1111's embedding default), no weight decay

    @property
    def network_alpha(self) -> float:
        return self.alpha if self.alpha is not None else self.rank / 2

    def trains_text_encoder(self, models) -> bool:
        return self.for_family("sdxl" if is_sdxl(models) else models.family.name).train_text_encoder  # type: ignore[return-value]

    def for_family(self, family: str) -> "LoraTrainingConfig":
        """This config with ``train_text_encoder`` decided: as given, else the family's default (on for SD 1.x /
        2.x, off for SDXL). Callers that know only the family name (a run checking a finished output before loading
        the model) and the trainer decide it here alike, so their fingerprints agree."""
        if self.train_text_encoder is not None:
            return self
        return replace(self, train_text_encoder=not family.startswith("sdxl"))

    def check(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("rank, steps, batch_size and save_every must be at least 1")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', not {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {self.mixed_precision!r}")
        if not 0 <= self.pivotal_vectors <= 75:
            raise ValueError(f"pivotal_vectors must be 0 to 75 (a prompt chunk holds 75 tokens), not {self.pivotal_vectors}")


@dataclass
class LoraTrainingResult:
    network: LoraNetwork  # detached from the model on return: ``network.attach()`` renders with it
    losses: list[float]  # per step, every run of a resumed training included
    steps: int
    resumed_from: int  # 0 for a fresh run
    resolution: int
    buckets: dict[Bucket, int]  # bucket -> number of images in it
    started_at: float  # unix time of the first run's start
    finished_at: float
    seconds: float  # training time summed over all runs
    fingerprint: str
    text_encoder: bool = True  # whether the text encoder(s) trained (config's None resolved for the family)
    extra: dict = field(default_factory=dict)
    # Pivotal tuning only: the trigger's trained vectors (n, width) float32 on the CPU and the name prompts say.
    token: str | None = None
    vectors: torch.Tensor | None = None


def is_sdxl(models) -> bool:
    return models.text_encoder_2 is not None or models.family.name.startswith("sdxl")


def refuse_unsupported(models) -> None:
    """ValueError for the SDXL refiner and inpainting models; SD 1.x, SD 2.x and SDXL base train."""
    if models.family.name == "sdxl-refiner":
        raise ValueError("LoRA training on the SDXL refiner is not supported; train on the SDXL base model "
                         "(the refiner only finishes renders, a product LoRA belongs on the base)")
    if models.family.inpainting:
        raise ValueError("LoRA training on an inpainting model is not supported; train on the base model")
    if not is_sdxl(models):
        refuse_unsupported_family(models, "LoRA")


def fingerprint(config: LoraTrainingConfig, image_set: ImageSet, base_sha256: str, resolution: int,
                token: str | None = None) -> str:
    if config.pivotal_vectors:
        return config_fingerprint(config, resolution=resolution, image_set=image_set.sha256, base=base_sha256,
                                  token=token)
    return config_fingerprint(config, resolution=resolution, image_set=image_set.sha256, base=base_sha256)


def lr_factor(config: LoraTrainingConfig) -> Callable[[int], float]:
    def factor(i: int) -> float:
        if i < config.warmup_steps:
            return (i + 1) / config.warmup_steps
        if config.lr_scheduler == "cosine":
            span = max(1, config.steps - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(i - config.warmup_steps, span) / span))
        return 1.0
    return factor


@torch.no_grad()
def cache_latents(models, image_set: ImageSet, assignment: dict[Bucket, list[int]]) -> dict[int, torch.Tensor]:
    """Image index -> (4, h, w) float32 scaled latents (posterior mean), one VAE call per image."""
    out: dict[int, torch.Tensor] = {}
    for bucket, members in assignment.items():
        for i in members:
            image = fit_to_bucket(open_image(image_set.items[i].path), bucket)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(bucket[1], bucket[0], 3)
            pixels = pixels.permute(2, 0, 1)[None].float() / 255.0
            latent = models.vae.encode_latents(pixels.to(models.device))[0].float()
            if not torch.isfinite(latent).all() and models.vae.dtype != torch.float32:
                # The SDXL VAE overflows in float16 (DESIGN "Family facts"): redo in float32 from now on, as the
                # pipeline's decode does, rather than train on NaN latents.
                models.vae = models.vae.float()
                latent = models.vae.encode_latents(pixels.to(models.device))[0].float()
            out[i] = latent
    return out


def size_conditioning(image_set: ImageSet, assignment: dict[Bucket, list[int]]) -> dict[int, tuple[int, ...]]:
    """Image index -> SDXL's (original h, w, crop top, left, target h, w), as sd-scripts builds them: the photo's
    size before the bucket resize, where :func:`fit_to_bucket` crops the resized photo, and the bucket. Telling the
    U-Net about the crop is what lets SDXL renders (crop 0, 0) come out uncropped."""
    out: dict[int, tuple[int, ...]] = {}
    for (bw, bh), members in assignment.items():
        for i in members:
            w, h = image_set.items[i].width, image_set.items[i].height
            _, (left, top, _, _) = cover_crop_box(w, h, (bw, bh))
            out[i] = (h, w, top, left, bh, bw)
    return out


def train_lora(
    models,
    image_set: ImageSet,
    config: LoraTrainingConfig,
    *,
    state_dir: str | os.PathLike[str],
    on_step: Callable[[int, int, float], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
    token: str | None = None,
) -> LoraTrainingResult:
    """Train a LoRA on ``models`` (an :class:`engine.loading.LoadedModels`) from ``image_set``.

    Pivotal tuning (``config.pivotal_vectors`` > 0, SD 1.x / 2.x): the trigger word in every caption is replaced by
    the embedding name ``token``, whose vectors (started from the class word's, as textual inversion starts) train
    with the LoRA. A made-up trigger is a few near-untrained sub-word tokens that shift "acme bottle" only a little
    from "bottle", so a U-Net LoRA learns the product for the class word as much as for the trigger; trained vectors
    give the U-Net a signal only the trigger sends, and regularisation images captioned with the class word alone
    then keep the class word as it was. Prompts say ``token`` and load the LoRA and the embedding together
    (:func:`engine.training.lora_export.export_pivotal_embedding` writes the embedding file).

    ``on_step(step, total, loss)`` after every step (step counts from 1); ``on_sample(step)`` (pivotal tuning:
    ``on_sample(step, embedding)`` with the current vectors) every ``sample_every`` steps with the LoRA attached to the
    models, so the caller can render with the current weights
    (a Pipeline on the same models must ``prompts.clear_cache()`` first: the text encoder changed). An exception
    from a callback stops the run like a kill: the last saved state stays and the next call resumes from it."""
    config.check()
    refuse_unsupported(models)
    # None resolved before the fingerprint: "the family's default" and that default spelled out are one training.
    config = replace(config, train_text_encoder=config.trains_text_encoder(models))
    device = models.device
    resolution, align = training_resolution(models, config.resolution)
    captions_of = [item.caption for item in image_set.items]
    if config.pivotal_vectors:
        captions_of = pivotal_captions(models, image_set, token)
    identity = fingerprint(config, image_set, models.checkpoint.sha256, resolution, token)
    claim_state_dir(Path(state_dir), FINGERPRINT_FILE, identity,
                    {"config": asdict(config), "image_set": image_set.sha256},
                    "training (other settings, images or base model)")

    assignment = bucket_images(image_set, resolution, align, config.max_bucket_ratio)
    latents = cache_latents(models, image_set, assignment)

    trains_text = config.trains_text_encoder(models)
    for net in (models.unet, models.text_encoder, models.text_encoder_2, models.vae):
        if net is not None:
            net.requires_grad_(False)
    targets = find_targets(models, text_encoder=trains_text, conv=config.conv)
    network = LoraNetwork(targets, config.rank, config.network_alpha, seed=config.seed).to(device)
    groups = [{"params": list(network.parameters_of(UNET)), "lr": config.lr}]
    if trains_text:
        groups.append({"params": list(network.parameters_of("text_encoder")), "lr": config.text_lr})
    embeddings, vectors = {}, None
    if config.pivotal_vectors:
        from engine.training.embedding_trainer import as_embedding, initial_vectors

        vectors = torch.nn.Parameter(initial_vectors(models.text_encoder, models.tokenizer, image_set.class_word,
                                                     config.pivotal_vectors).to(device))
        embeddings = {token: as_embedding(token, vectors)}
        groups.append({"params": [vectors], "lr": config.pivotal_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config))
    gen = torch.Generator().manual_seed(config.seed)

    def snapshot() -> dict:
        out = {"lora": network.state_dict()}
        if vectors is not None:
            out["vectors"] = vectors.detach().cpu().clone()
        return out

    run = RunState(Path(state_dir) / STATE_FILE, identity, opt, sched, gen, snapshot)
    state = run.resume()
    if state is not None:
        network.load_state_dict(state["lora"])
        if vectors is not None:
            with torch.no_grad():
                vectors.copy_(state["vectors"])
        del state

    autocast, wrapped = cuda_speedups(models, config.mixed_precision, config.gradient_checkpointing)
    diffusion = DiffusionStep(models, gen, noise_offset=config.noise_offset, autocast=autocast)
    sdxl = is_sdxl(models)
    context_for = CaptionContexts(models, clip_skip=config.clip_skip, trains=trains_text, embeddings=embeddings)
    sdxl_cond = SDXLConditioning(models, clip_skip=config.clip_skip, trains=trains_text) if sdxl else None
    sizes = size_conditioning(image_set, assignment) if sdxl else {}
    params = [p for g in groups for p in g["params"]]

    def sample_with_vectors(done: int) -> None:
        # As the embedding trainer does: the sampler gets the current vectors, to render prompts saying ``token``.
        on_sample(done, as_embedding(token, vectors.detach().float().cpu().clone()))  # type: ignore[call-arg,misc,union-attr]

    sample = sample_with_vectors if on_sample is not None and vectors is not None else on_sample
    run.start_clock()

    network.attach()
    try:
        for i, members in planned_batches(assignment, config.batch_size, config.seed, run.first, config.steps):
            x0 = torch.stack([latents[m] for m in members])
            captions = [captions_of[m] for m in members]
            # Drawn before the noise (the shared draw order of engine.training.diffusion_step).
            drop = (torch.rand(len(captions), generator=gen) < config.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
            encode: Callable[[list[str]], torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = context_for
            if sdxl_cond is not None:
                size_ids = torch.tensor([sizes[m] for m in members], dtype=torch.float32)
                encode = lambda caps, ids=size_ids: sdxl_cond(caps, ids)  # noqa: E731
            pred, target = diffusion.predict(x0, encode, captions)
            loss = F.mse_loss(pred, target)
            optimizer_step(loss, opt, sched, params, 1.0)
            run.end_step(i + 1, config.steps, loss.item(), save_every=config.save_every,
                         sample_every=config.sample_every, on_step=on_step, on_sample=sample)
    finally:
        network.detach()
        uncheckpoint_blocks(wrapped)
    return LoraTrainingResult(
        network=network, losses=run.losses, steps=config.steps, resumed_from=run.first, resolution=resolution,
        buckets={b: len(m) for b, m in assignment.items()}, started_at=run.started_at, finished_at=time.time(),
        seconds=run.seconds(), fingerprint=identity, text_encoder=trains_text,
        extra={"mean_ar_error": _mean_ar_error(image_set, assignment)},
        token=token if vectors is not None else None,
        vectors=vectors.detach().float().cpu().clone() if vectors is not None else None,
    )


def pivotal_captions(models, image_set: ImageSet, token: str | None) -> list[str]:
    """The captions with the trigger replaced by ``token``; ValueError for a name prompts could not say, an SDXL
    model (its embeddings need clip_l and clip_g vectors) or a set where no caption says the trigger."""
    from engine.training.embedding_trainer import check_token, token_captions

    if is_sdxl(models):
        raise ValueError("pivotal tuning on SDXL is not supported yet (its embeddings need clip_l and clip_g "
                         "vectors trained together); train the LoRA without it")
    if not token:
        raise ValueError("pivotal tuning needs the embedding's name (the word prompts will say for the trigger)")
    check_token(token, models.tokenizer, class_word=image_set.class_word)
    captions = token_captions(image_set, token)
    if not any(token in c for c in captions):
        raise ValueError(f"no caption says the trigger {image_set.trigger!r}: the embedding {token!r} would never "
                         "be trained")
    return captions


def _mean_ar_error(image_set: ImageSet, assignment: dict[Bucket, list[int]]) -> float:
    """kohya's ``mean_img_ar_error``: mean |image aspect - bucket aspect|."""
    errors = [abs(image_set.items[i].width / image_set.items[i].height - b[0] / b[1])
              for b, members in assignment.items() for i in members]
    return sum(errors) / len(errors)

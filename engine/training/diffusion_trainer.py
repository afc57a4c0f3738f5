"""Training the text encoder and the U-Net together on eps-prediction with the SD 1.x noise schedule.

Each step: latents of a batch (precomputed with the frozen VAE), captions tokenized exactly as at inference
(:func:`engine.conditioning.chunk_prompt`, so training and sampling see the same 77-token frames), some
captions dropped to "" so the model also learns the unconditional prediction that classifier-free guidance
needs, timesteps drawn uniformly from 0..999, x_t = sqrt(ac) x0 + sqrt(1-ac) eps, loss = MSE(eps_hat, eps).
An exponential moving average of the weights is kept and is what gets saved.

Two additions aimed at the one thing plain eps-MSE learns badly: the colour of large flat areas (backgrounds).
That colour is decided at high noise, where x0 = (x_t - sigma * eps_hat) / ... turns a tiny error in the
*spatial mean* of eps_hat into a large colour error (at sigma 14.6 an eps-mean error of 0.01 moves the whole
background by 0.15 latent units), while that error costs almost nothing in eps-MSE (1e-4). So:

* ``lowfreq_weight``: an extra loss on the coarse (``lowfreq_pool`` x ``lowfreq_pool`` average-pooled) part of the
  eps error, weighted by min(sigma^2, ``lowfreq_sigma_cap``^2) -- i.e. measured in x0 units, capped so that the
  irreducible uncertainty of a layout at pure noise does not dominate. The network still predicts eps (the
  checkpoint is an ordinary SD 1.x eps model); only the weighting of its error changes.
* ``noise_offset``: a per-image, per-channel constant added to the noise (the "offset noise" of SD fine-tunes), so
  at high noise the mean of x_t says less about the background and the caption has to say it.
* ``mean_weight``: the same idea for the whole image's mean per channel, weighted by sigma^2 without a cap: at
  sigma 14.6 (where sampling starts) only the caption can say the background's colour, and that first prediction
  fixes it for the rest of the sampling.
* ``high_noise_share``: that share of each batch draws t from ``high_noise_from``..999 instead of 0..999, since
  uniform t spends only 30 % of the samples where the background is decided.

One addition for shapes: ``edge_weight`` adds the eps error again on the latent pixels where the clean latents
change (the object's outline; :func:`latent_edge_map`). An object's shape lives in a few edge latents (a small
object is 4 latents across), and plain MSE spends its capacity evenly over the flat areas that make up most of
every image. The outline is lost at low noise, where eps units (not x0 units) are the right weighting. A
per-pixel weight leaves the loss's minimiser (the conditional mean) where it was; it only moves where a model
short of capacity and steps makes its errors.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel

from engine.conditioning import chunk_prompt
from engine.schedule import DiscreteSchedule
from engine.tokenizer import EOS_ID, ClipTokenizer
from engine.unet import UNetModel

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class DiffusionTrainingConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 4e-4
    text_lr: float | None = None  # defaults to lr
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    warmup: int = 200
    seed: int = 0
    log_every: int = 100
    lowfreq_weight: float = 0.0
    lowfreq_pool: int = 4
    lowfreq_sigma_cap: float = 5.0
    noise_offset: float = 0.0
    mean_weight: float = 0.0
    high_noise_share: float = 0.0
    high_noise_from: int = 700
    text_aux_weight: float = 0.0
    # Weight of the eps error counted again on the clean latents' outlines (latent_edge_map; module docstring).
    edge_weight: float = 0.0


def tokenize_captions(captions: Sequence[str], tokenizer: ClipTokenizer) -> torch.Tensor:
    """(B, 77) ids of each caption's first chunk; training captions are shorter than one chunk."""
    return torch.tensor([chunk_prompt(c, tokenizer)[0].framed()[0] for c in captions])


class TextToImageModel(nn.Module):
    """The two trained networks as one module, so one optimizer and one EMA cover both.

    ``aux_classes``: one linear head per caption attribute (e.g. 10 background colours), reading the text
    encoder's states from the first EOS on -- the padding states every U-Net position can attend to. They give
    the text encoder a direct reason to carry each attribute there; they are training-only and never exported."""

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextModel, aux_classes: Sequence[int] = ()):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        hidden = text_encoder.config.hidden_size
        self.aux = nn.ModuleList(nn.Linear(hidden, n) for n in aux_classes)
        for head in self.aux:  # zero start: deterministic, and the cross-entropy gradient is not zero there
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

def padding_state_mean(context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, hidden) mean of the text encoder's states from each caption's first EOS on (EOS and its padding)."""
    after_eos = ((ids == EOS_ID).cumsum(1) > 0).unsqueeze(-1).to(context.dtype)
    return (context * after_eos).sum(1) / after_eos.sum(1).clamp(min=1)


def text_aux_loss(model: TextToImageModel, context: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the attribute heads over the captions that state each attribute (target -100: not
    stated, e.g. a dropped or partial caption)."""
    pooled = padding_state_mean(context, ids)
    terms = [F.cross_entropy(head(pooled), targets[:, k], ignore_index=-100)
             for k, head in enumerate(model.aux) if bool((targets[:, k] != -100).any())]
    return torch.stack(terms).mean() if terms else context.new_zeros(())


def latent_edge_map(latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) in [0, 1]: how much each latent differs from its 3x3 neighbourhood's mean (summed over
    channels), divided by the image's largest such difference (at least 0.01). Flat areas and linear ramps (gradient
    backgrounds, whose neighbourhood mean is the centre value) give 0, outlines give most; the image border is
    padded by replication, so a flat background's edge rows give 0 too."""
    padded = F.pad(latents, (1, 1, 1, 1), mode="replicate")
    local = (latents - F.avg_pool2d(padded, 3, stride=1)).abs().sum(1, keepdim=True)
    # The floor keeps float rounding in a flat image (1e-7) from being blown up to full weight; an outline between
    # two of the demo's colours differs by ~1 latent unit.
    return local / local.amax(dim=(2, 3), keepdim=True).clamp(min=1e-2)


def diffusion_loss(
    model: TextToImageModel, latents: torch.Tensor, ids: torch.Tensor, ac: torch.Tensor, gen: torch.Generator,
    config: DiffusionTrainingConfig | None = None, targets: torch.Tensor | None = None,
) -> torch.Tensor:
    config = config or DiffusionTrainingConfig()
    b, c = latents.shape[:2]
    t = torch.randint(0, ac.shape[0], (b,), generator=gen)
    if config.high_noise_share:
        high = torch.rand(b, generator=gen) < config.high_noise_share
        t = torch.where(high, torch.randint(config.high_noise_from, ac.shape[0], (b,), generator=gen), t)
    noise = torch.randn(latents.shape, generator=gen)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn((b, c, 1, 1), generator=gen)
    a = ac[t].float()[:, None, None, None]
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    context = model.text_encoder(input_ids=ids).last_hidden_state
    eps_hat = model.unet(x_t, t.float(), context)
    loss = F.mse_loss(eps_hat, noise)
    if config.text_aux_weight and targets is not None and len(model.aux):
        loss = loss + config.text_aux_weight * text_aux_loss(model, context, ids, targets)
    if config.lowfreq_weight:
        pool = min(config.lowfreq_pool, latents.shape[-1], latents.shape[-2])
        coarse = F.avg_pool2d(eps_hat - noise, pool, ceil_mode=True)
        sigma2 = ((1 - a) / a).clamp(max=config.lowfreq_sigma_cap**2)
        loss = loss + config.lowfreq_weight * (sigma2 * coarse.square()).mean()
    if config.mean_weight:
        # The image-wide mean of the x0 error, per channel, uncapped: the background's colour, which the caption
        # fixes even at pure noise (unlike the layout, which the coarse term above must not over-weight).
        mean_err = (eps_hat - noise).mean(dim=(2, 3))
        loss = loss + config.mean_weight * (((1 - a) / a)[:, :, 0, 0] * mean_err.square()).mean()
    if config.edge_weight:
        loss = loss + config.edge_weight * (latent_edge_map(latents) * (eps_hat - noise).square()).mean()
    return loss


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_text_to_image(
    unet: UNetModel,
    text_encoder: CLIPTextModel,
    tokenizer: ClipTokenizer,
    sample_batch: Callable[[int, torch.Generator], tuple],
    config: DiffusionTrainingConfig,
    *,
    aux_classes: Sequence[int] = (),
    schedule: DiscreteSchedule | None = None,
    log: LogFn | None = None,
    state_file: str | os.PathLike[str] | None = None,
    save_every: int = 250,
    on_checkpoint: Callable[[int, TextToImageModel], None] | None = None,
) -> tuple[TextToImageModel, list[float], float]:
    """Train both networks; ``sample_batch(n, gen)`` returns (scaled latents (n,4,h,w), captions) and must
    draw all its randomness from ``gen``. With ``aux_classes`` and ``config.text_aux_weight`` it returns a third
    item, (n, len(aux_classes)) class indices of each caption's attributes (-100 where a caption doesn't say).

    With ``state_file``, the full training state (weights, EMA, optimizer, schedule, step, generator) is saved
    there every ``save_every`` steps and a run started with an existing file continues from it: a killed
    training run resumes where it was, with the same result as an uninterrupted one.

    ``on_checkpoint(step, ema)`` is called every ``save_every`` steps (e.g. to score the EMA model while it trains).

    Returns the EMA model (what should be saved), the per-step losses of the live model and the seconds spent
    training, summed over every run of a resumed training (so a report made after a resume is still true)."""
    ac = (schedule or DiscreteSchedule.sd1()).alphas_cumprod
    model = TextToImageModel(unet, text_encoder, aux_classes if config.text_aux_weight else ()).train().requires_grad_(True)
    # The position-id buffer is not a parameter; the EMA copy shares the architecture, not the optimizer.
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    text_lr = config.text_lr or config.lr
    opt = torch.optim.AdamW(
        [
            {"params": list(model.unet.parameters()), "lr": config.lr},
            {"params": list(model.text_encoder.parameters()) + list(model.aux.parameters()), "lr": text_lr},
        ],
        weight_decay=config.weight_decay,
        betas=(0.9, 0.99),
    )
    steps = config.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: min(1.0, (i + 1) / max(1, config.warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))),
    )
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    first = 0
    earlier_seconds = 0.0
    if state_file is not None and Path(state_file).exists():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        losses = list(state["losses"])
        first = int(state["step"])
        earlier_seconds = float(state.get("seconds", 0.0))
        if log:
            log(f"resumed diffusion training at step {first}/{steps} from {state_file}")

    def save(step_done: int) -> None:
        tmp = f"{state_file}.part"
        torch.save(
            {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": gen.get_state(), "losses": losses, "step": step_done,
             "seconds": earlier_seconds + time.perf_counter() - start},
            tmp,
        )
        os.replace(tmp, state_file)  # type: ignore[arg-type]

    start = time.perf_counter()
    for step in range(first, steps):
        latents, captions, *rest = sample_batch(config.batch_size, gen)
        drop = torch.rand(len(captions), generator=gen) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        targets = rest[0].masked_fill(drop[:, None], -100) if rest and len(model.aux) else None
        ids = tokenize_captions(captions, tokenizer)
        loss = diffusion_loss(model, latents, ids, ac, gen, config, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # Short runs (tests, smoke runs) would average in mostly random weights with a fixed long decay.
        _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if state_file is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            save(step + 1)
        if on_checkpoint is not None and (step + 1) % save_every == 0:
            on_checkpoint(step + 1, ema)
        if log and (step % config.log_every == 0 or step == steps - 1):
            rate = (step + 1 - first) / (time.perf_counter() - start)
            recent = sum(losses[-config.log_every :]) / len(losses[-config.log_every :])
            log(f"diffusion step {step + 1}/{steps} loss {recent:.4f} ({rate:.2f} it/s)")
    model.eval().requires_grad_(False)
    return ema, losses, earlier_seconds + time.perf_counter() - start

"""Training an SD-style KL autoencoder (8x downsampling, 4 latent channels) on a stream of images.

Loss: L1 + MSE reconstruction plus a small KL term that keeps the posterior near N(0, 1) so that noisy latents
stay decodable; no adversarial or perceptual loss (the demo world is flat colours and sharp edges, which the
pixel losses already capture). After training, :func:`calibrate_latent_scale` rescales the latent space so
that ``latent * 0.18215`` has unit variance: the file then works with SD 1.x's fixed scaling factor, and
needs no extra metadata.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from engine.vae import AutoencoderKL

LogFn = Callable[[str], None]


def vae_loss(vae: AutoencoderKL, images01: torch.Tensor, kl_weight: float, gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    pixels = images01 * 2 - 1
    mean, logvar = vae.encode(pixels)
    std = torch.exp(0.5 * logvar)
    noise = torch.randn(mean.shape, generator=gen, dtype=mean.dtype, device="cpu").to(mean.device)
    z = mean + std * noise
    recon = vae.decode(z)
    l1 = F.l1_loss(recon, pixels)
    mse = F.mse_loss(recon, pixels)
    kl = 0.5 * torch.mean(mean**2 + logvar.exp() - 1.0 - logvar)
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def adamw_warmup_cosine(params, lr: float, steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay, beta2 0.99) with a linear warmup over the first 5 % of ``steps``, then a cosine decay
    to 0: the optimizer of the autoencoder trainings."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    return opt, sched


def clipped_update(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                   params: list[torch.nn.Parameter], max_norm: float = 1.0) -> None:
    """One training update of the autoencoder trainings: the gradients of ``loss``, clipped to a total norm of
    ``max_norm`` over ``params``, an optimizer step, then the schedule's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    sched.step()


def train_vae(
    vae: AutoencoderKL,
    batches: Iterator[torch.Tensor],
    steps: int,
    *,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    log: LogFn | None = None,
    log_every: int = 100,
) -> list[float]:
    """Train in place for ``steps`` batches of [0, 1] images; returns the loss of every step."""
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    opt, sched = adamw_warmup_cosine(params, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        images = next(batches)
        loss, parts = vae_loss(vae, images, kl_weight, gen)
        clipped_update(loss, opt, sched, params)
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} l1 {parts['l1']:.4f} kl {parts['kl']:.2f} ({rate:.1f} it/s)")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def calibrate_latent_scale(vae: AutoencoderKL, images01: torch.Tensor) -> float:
    """Rescale the latent space in place so that ``mean_latent * scaling_factor`` has unit standard deviation.

    quant_conv's mean half is multiplied by k and its log-variance half shifted by 2 log k; post_quant_conv's
    input weights are divided by k. Reconstructions are unchanged; latents are k times larger. Returns k.
    """
    mean, _ = vae.encode(images01 * 2 - 1)
    target = 1.0 / vae.config.scaling_factor
    k = target / mean.std().item()
    zc = vae.config.embed_dim
    q = vae.quant_conv
    q.weight[:zc] *= k
    q.bias[:zc] *= k
    q.bias[zc:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k

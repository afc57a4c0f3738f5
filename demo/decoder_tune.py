"""Fine-tuning a VAE's decoder alone, so that it draws sharp outlines from the latents the encoder already makes.

Why (the demo model): the analytic VAE start (:mod:`demo.vae_init`) encodes each 8x8 block to its
mean colour and decodes every latent back to a flat 8x8 block, so every picture is a 16x16 mosaic and a shape
survives only in the mixed colours of its edge blocks. The mixed colours of a block and its neighbours still say where the outline runs, and
a decoder can learn to draw it. The encoder -- and so every latent the U-Net was trained on -- stays exactly as
it is: a tuned decoder can be put into a file whose U-Net is already trained.

What trains: the residual blocks of the decoder's mid block and of every level but the full-resolution one
(level 0). The trunk (``conv_in``, the upsampling convs, ``norm_out``, ``conv_out``, ``post_quant_conv``) keeps the
analytic start's linear pass-through (training every VAE weight breaks it within a few steps), and so does the
mid block's attention.

Edges only: each block's last conv (``conv2``, zero at the start) is kept *zero-sum* -- for every output and
input channel its 3x3 taps add up to 0 (projected after every optimizer step) -- and its bias stays 0. A
zero-sum kernel gives 0 on a field that is constant under it, and everything before it in the block (GroupNorm
with image-wide statistics, SiLU, ``conv1``) maps a locally constant input to a locally constant output, so a
block adds nothing at a pixel whose 5x5 neighbourhood (at its level, inside the image: zero padding makes the
border non-constant) is flat. Stacked, the tuned decoder draws the inside of a large flat area flat, at the
analytic start's colour up to a uniform shift through the final GroupNorm's image-wide statistics (under one
level of 255; tested), and what the tune can change gathers on outlines and near the image border (which the loss
sees like any other pixel). Without the constraint the tune does not train at all: even a tiny step taken
down the gradient of a single unconstrained ``conv2`` raises the loss, because every flat pixel, exactly right
at the start, moves with it (demo/NOTES.md has the measurements).

The loss is MSE alone: L1's kink at zero error makes every exactly-right pixel push back against any change
(with SD's L1 + MSE the tune left the loss and the shapes read where they were).

Level 0 stays the identity it starts as, for speed: its two blocks run at the full 128x128 and cost three
quarters of the decoder's arithmetic, and detail at the 64x64 level (2x2 pixels) is enough to draw the demo's
shapes. Since its branches are exactly zero and the last upsampling conv is exactly the identity, training skips
them (:func:`decode_for_training`, equal to the full decoder to float precision; tested); at inference the
file's decoder runs as any SD decoder does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.training.vae_trainer import adamw_warmup_cosine, clipped_update
from engine.vae import AutoencoderKL, ResnetBlock

LogFn = Callable[[str], None]
# sample_batch(n, generator) -> (unscaled latents (n, z, h, w), target images in [0, 1] (n, 3, 8h, 8w))
DecoderBatchFn = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]

__all__ = ["decode_for_training", "decoder_tune_parameters", "train_decoder"]


def _tuned_blocks(vae: AutoencoderKL) -> list[ResnetBlock]:
    dec = vae.decoder
    blocks = [dec.mid.block_1, dec.mid.block_2]
    for level in list(dec.up)[1:]:
        blocks += list(level.block)
    return blocks


def decoder_tune_parameters(vae: AutoencoderKL) -> list[nn.Parameter]:
    """The parameters a decoder-only tune trains: the residual blocks of the mid block and of every level but
    level 0, less each block's ``conv2.bias`` (which stays 0; see the module docstring)."""
    return [p for block in _tuned_blocks(vae) for p in block.parameters() if p is not block.conv2.bias]


@torch.no_grad()
def _zero_sum_(blocks: list[ResnetBlock]) -> None:
    """Project each block's ``conv2`` kernel onto the zero-sum kernels (taps of every output/input pair add to 0)."""
    for block in blocks:
        w = block.conv2.weight
        w -= w.mean(dim=(2, 3), keepdim=True)


def _is_identity_block(block: ResnetBlock) -> bool:
    return block.nin_shortcut is None and not block.conv2.weight.any() and not block.conv2.bias.any()


def _is_identity_conv(conv: nn.Conv2d) -> bool:
    w = conv.weight
    if w.shape[0] != w.shape[1] or conv.bias.any():
        return False
    kh, kw = w.shape[-2:]
    expected = torch.zeros_like(w)
    expected[:, :, kh // 2, kw // 2] = torch.eye(w.shape[0], dtype=w.dtype)
    return torch.equal(w, expected)


def _level0_is_identity(vae: AutoencoderKL) -> bool:
    dec = vae.decoder
    return (len(dec.up) > 1 and all(_is_identity_block(b) for b in dec.up[0].block)
            and _is_identity_conv(dec.up[1].upsample.conv))


def decode_for_training(vae: AutoencoderKL, z: Tensor, *, skip_level0: bool) -> Tensor:
    """``vae.decode(z)``; with ``skip_level0`` (level 0's blocks are the identity and level 1's upsampling conv is
    too) those are left out -- the same result for a quarter of the arithmetic."""
    if not skip_level0:
        return vae.decode(z)
    dec = vae.decoder
    h = dec.mid(dec.conv_in(vae.post_quant_conv(z)))
    for i in reversed(range(1, len(dec.up))):
        level = dec.up[i]
        for block in level.block:
            h = block(h)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest") if i == 1 else level.upsample(h)
    return dec.conv_out(F.silu(dec.norm_out(h)))


def train_decoder(
    vae: AutoencoderKL,
    sample_batch: DecoderBatchFn,
    steps: int,
    *,
    batch_size: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    log: LogFn | None = None,
    log_every: int = 100,
) -> list[float]:
    """Train the decoder's :func:`decoder_tune_parameters` in place for ``steps`` batches (MSE in pixels,
    each image and its latent mirrored left-right half the time); every other VAE weight is left untouched.
    Returns the loss of every step. Draws random numbers only from its own generator (seeded with ``seed``), so
    it disturbs nothing drawn after it."""
    vae.eval().requires_grad_(False)
    blocks = _tuned_blocks(vae)
    if any(block.conv2.bias.any() for block in blocks):
        raise ValueError("decoder tune: a tuned block's conv2 has a nonzero bias, so flat areas would not be kept")
    _zero_sum_(blocks)
    params = decoder_tune_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    skip = _level0_is_identity(vae)
    opt, sched = adamw_warmup_cosine(params, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        z, images01 = sample_batch(batch_size, gen)
        target = images01 * 2 - 1
        # The scenes' shapes are all symmetric left-right, and the encoder (block means) commutes with a mirror.
        flip = (torch.rand(z.shape[0], generator=gen) < 0.5)[:, None, None, None]
        z, target = torch.where(flip, z.flip(-1), z), torch.where(flip, target.flip(-1), target)
        recon = decode_for_training(vae, z, skip_level0=skip)
        loss = F.mse_loss(recon, target)
        clipped_update(loss, opt, sched, params)
        _zero_sum_(blocks)  # back onto the zero-sum kernels (the schedule's step only sets the next lr)
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"decoder step {step + 1}/{steps} loss {loss.item():.4f} ({rate:.2f} it/s)")
    vae.eval().requires_grad_(False)
    return losses

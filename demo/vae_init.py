"""An analytic starting point for training an SD-topology VAE on flat-colour images.

Why: the LDM decoder ends in ``GroupNorm(32) -> SiLU -> conv_out``. GroupNorm normalises each group of channels
over its channels *and* the whole image, so on a flat-colour area the absolute level of a channel is gone;
what survives is only the pattern *within* a group. A VAE trained from random weights must discover a code that
survives that, and on our procedural scenes (flat colours, no texture) it does so very slowly (demo/NOTES.md).

The trick: with 4 channels per group (width 128), a group holding ``(s, -s, A, -A)`` for a signal ``s`` and a
large constant ``A`` has mean exactly 0 and a variance of ``(E[s^2] + A^2) / 2``, which for ``|s| <= 1`` and
``A = 10`` varies by under 0.5 % whatever the image holds. GroupNorm then passes ``s`` through linearly. The
constants come from conv biases; every residual branch starts at zero (the zero-init residual rule), so the
trunk is linear:

* encoder: pixels -> groups ``(c, -c, A, -A)`` for c in R, G, B (round robin over the 32 groups) -> three 2x2
  average-pool downsamplings -> identity mid block -> GroupNorm trick -> the posterior mean is each 8x8 block's
  mean colour (latent channels 0-2; channel 3 starts near zero, free for training to use), log-variance -8;
* decoder: latents -> the same groups -> nearest-neighbour upsampling -> GroupNorm trick -> SiLU (the odd
  difference ``SiLU(4 + s) - SiLU(4 - s)`` is linear in ``s`` to 0.2 %) -> RGB.

So training starts from a VAE that reproduces every colour exactly, blocky at 8x8 edges, and spends its steps
on edges and shapes (the residual branches, the attention and the free latent channel), not on colour codes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.vae import AttnBlock, AutoencoderKL, Downsample, ResnetBlock, Upsample

__all__ = ["init_block_average_vae", "requirements_met"]

GROUPS = 32
CONSTANT = 10.0
SILU_BIAS = 4.0
# d/dx SiLU at SILU_BIAS: the slope of SiLU(b + s) - SiLU(b - s) around s = 0, divided out in conv_out.
_SLOPE = (lambda s: s * (1 + SILU_BIAS * (1 - s)))(1 / (1 + math.exp(-SILU_BIAS)))


def requirements_met(vae: AutoencoderKL) -> str | None:
    """None if the analytic start applies to this config, else why not."""
    c = vae.config
    if c.ch != 4 * GROUPS or any(m != 1 for m in c.ch_mult):
        return f"needs ch={4 * GROUPS} and ch_mult of all 1 (one width everywhere), got ch={c.ch}, ch_mult={c.ch_mult}"
    if c.in_channels != 3 or c.out_channels != 3 or c.z_channels < 3:
        return "needs RGB in and out and at least 3 latent channels"
    return None


def _signal_of_group(g: int) -> int:
    return g % 3  # R, G, B round robin: 11, 11, 10 groups


def _zero_(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


def _center_tap(conv: nn.Conv2d) -> torch.Tensor:
    """View of the weight's centre tap (out, in) after zeroing the whole kernel."""
    nn.init.zeros_(conv.weight)
    kh, kw = conv.weight.shape[-2:]
    return conv.weight[:, :, kh // 2, kw // 2]


def _to_groups(conv: nn.Conv2d, n_inputs: int) -> None:
    """conv (n_inputs -> 128): group g = (x_c, -x_c, A, -A) with c = signal of g."""
    w = _center_tap(conv)
    nn.init.zeros_(conv.bias)
    for g in range(GROUPS):
        c = _signal_of_group(g)
        if c < n_inputs:
            w[4 * g, c] = 1.0
            w[4 * g + 1, c] = -1.0
        conv.bias[4 * g + 2] = CONSTANT
        conv.bias[4 * g + 3] = -CONSTANT


def _group_trick_norm(norm: nn.GroupNorm) -> None:
    """GroupNorm affine so that the signal channels come out as (SILU_BIAS + s, SILU_BIAS - s), constants as 0."""
    scale = CONSTANT / math.sqrt(2.0)
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
        for g in range(GROUPS):
            norm.weight[4 * g] = scale
            norm.weight[4 * g + 1] = scale
            norm.bias[4 * g] = SILU_BIAS
            norm.bias[4 * g + 1] = SILU_BIAS


def _from_groups(conv: nn.Conv2d, n_outputs: int) -> None:
    """conv (128 -> n): output c = mean over c's groups of (SiLU(b + s) - SiLU(b - s)) / (2 slope)."""
    w = _center_tap(conv)
    nn.init.zeros_(conv.bias)
    counts = [sum(1 for g in range(GROUPS) if _signal_of_group(g) == c) for c in range(3)]
    for g in range(GROUPS):
        c = _signal_of_group(g)
        if c < n_outputs:
            w[c, 4 * g] = 1.0 / (2 * _SLOPE * counts[c])
            w[c, 4 * g + 1] = -1.0 / (2 * _SLOPE * counts[c])


def _identity_residuals(root: nn.Module) -> None:
    """Every residual branch starts at zero, so each block is the identity (its first layers keep random weights,
    so gradients reach them as soon as the zeroed last layer moves)."""
    for m in root.modules():
        if isinstance(m, ResnetBlock):
            _zero_(m.conv2)
        elif isinstance(m, AttnBlock):
            _zero_(m.proj_out)


def _average_downsample(down: Downsample) -> None:
    w = down.conv.weight
    with torch.no_grad():
        w.zero_()
        down.conv.bias.zero_()
        for ch in range(w.shape[0]):
            w[ch, ch, 0:2, 0:2] = 0.25  # taps 0 and 1 only: the right/bottom padding is never read


def _nearest_upsample(up: Upsample) -> None:
    w = _center_tap(up.conv)
    with torch.no_grad():
        nn.init.zeros_(up.conv.bias)
        w.copy_(torch.eye(w.shape[0]))


@torch.no_grad()
def init_block_average_vae(vae: AutoencoderKL, *, seed: int = 0) -> None:
    """Overwrite ``vae``'s weights with the analytic start described in the module docstring."""
    why = requirements_met(vae)
    if why:
        raise ValueError(f"block-average VAE start: {why}")
    gen = torch.Generator().manual_seed(seed)
    enc, dec = vae.encoder, vae.decoder
    _identity_residuals(vae)
    _to_groups(enc.conv_in, 3)
    for level in enc.down:
        if level.downsample is not None:
            _average_downsample(level.downsample)
    _group_trick_norm(enc.norm_out)
    z = vae.config.z_channels
    _from_groups(enc.conv_out, 3)  # mean channels 0..2 = block colour
    # Latent channel 3+ (free for training) and the log-variance: tiny random weights break the symmetry that
    # would keep a zero channel at zero; log-variance starts small (a nearly deterministic encoder).
    enc.conv_out.weight[3:z].normal_(0.0, 1e-3, generator=gen)
    enc.conv_out.bias[z:] = -8.0
    for q in (vae.quant_conv, vae.post_quant_conv):
        w = _center_tap(q)
        w.copy_(torch.eye(w.shape[0], w.shape[1]))
        q.bias.zero_()
    _to_groups(dec.conv_in, 3)
    dec.conv_in.weight[:, 3:z].normal_(0.0, 1e-3, generator=gen)
    for level in dec.up:
        if level.upsample is not None:
            _nearest_upsample(level.upsample)
    _group_trick_norm(dec.norm_out)
    _from_groups(dec.conv_out, 3)

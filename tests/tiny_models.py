"""Tiny random models in the real single-file SD 1.x checkpoint layout, built by the tests themselves.

Same topology as SD 1.5 (two U-Net levels instead of four, narrow widths), so every load path a real
checkpoint takes is exercised in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from engine.models import META_TEXT_HEADS, META_UNET_HEADS
from engine.text_encoder import TextEncoderConfig, build_text_encoder
from engine.unet import UNetConfig, UNetModel
from engine.vae import AutoencoderKL, VAEConfig

TINY_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_levels=(0, 1),
    num_heads=8,
    context_dim=32,
)
TINY_TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=2)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights with some spread, so zero-initialised layers do not hide mistakes."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)


def tiny_sd1_state_dict(
    seed: int = 0,
    *,
    unet: UNetConfig = TINY_UNET,
    text: TextEncoderConfig = TINY_TEXT,
    vae: VAEConfig = TINY_VAE,
    inpaint: bool = False,
    clip_text_model_level: bool = True,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if inpaint:
        unet = UNetConfig(**{**unet.__dict__, "in_channels": 9})
    parts: dict[str, torch.Tensor] = {}
    u = UNetModel(unet)
    _randomize(u, gen)
    parts.update({UNET_PREFIX + k: v for k, v in u.state_dict().items()})
    t = build_text_encoder(text)
    _randomize(t, gen)
    clip_prefix = CLIP_PREFIX + ("text_model." if clip_text_model_level else "")
    parts.update({clip_prefix + k: v for k, v in t.state_dict().items()})
    v = AutoencoderKL(vae)
    _randomize(v, gen)
    parts.update({VAE_PREFIX + k: v_ for k, v_ in v.state_dict().items()})
    return {k: x.contiguous() for k, x in parts.items()}


def tiny_metadata(unet: UNetConfig = TINY_UNET, text: TextEncoderConfig = TINY_TEXT) -> dict[str, str]:
    return {META_UNET_HEADS: str(unet.num_heads), META_TEXT_HEADS: str(text.num_heads)}


def write_tiny_sd1(path: Path, seed: int = 0, *, inpaint: bool = False, **kw) -> Path:
    save_file(tiny_sd1_state_dict(seed, inpaint=inpaint, **kw), str(path), metadata=tiny_metadata())
    return path

"""Random-weight SD 1.x checkpoints in the real single-file layout.

For smoke tests of a machine, benchmarks at real SD 1.5 shapes, and the test suite's tiny models: the file
goes through exactly the loader a downloaded checkpoint does. The images it renders are noise by design.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from engine.checkpoint_writer import save_sd1_checkpoint, sd1_state_dict
from engine.loading import META_TEXT_HEADS, META_UNET_HEADS
from engine.text_encoder import TextEncoderConfig, build_text_encoder
from engine.unet import UNetConfig, UNetModel
from engine.vae import AutoencoderKL, VAEConfig

# Same topology as SD 1.5 (two U-Net levels instead of four, narrow widths): loads and renders in milliseconds.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=8, context_dim=32)
TINY_TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=2)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

PRESETS: dict[str, tuple[UNetConfig, TextEncoderConfig, VAEConfig]] = {
    "tiny": (TINY_UNET, TINY_TEXT, TINY_VAE),
    "sd15": (UNetConfig(), TextEncoderConfig(), VAEConfig()),  # the real SD 1.5 shapes (~4.3 GB in float32)
}


def randomize_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights with some spread (norm gains near 1, fan-in scaled elsewhere), so that no layer is
    left at zero and every tensor of a parity test carries signal."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)


def random_sd1_models(
    seed: int = 0, *, unet: UNetConfig = TINY_UNET, text: TextEncoderConfig = TINY_TEXT, vae: VAEConfig = TINY_VAE, inpaint: bool = False
) -> tuple[UNetModel, torch.nn.Module, AutoencoderKL]:
    gen = torch.Generator().manual_seed(seed)
    if inpaint:
        unet = replace(unet, in_channels=9)
    modules = (UNetModel(unet), build_text_encoder(text), AutoencoderKL(vae))
    for module in modules:
        randomize_(module, gen)
    return modules  # type: ignore[return-value]


def random_sd1_state_dict(
    seed: int = 0,
    *,
    unet: UNetConfig = TINY_UNET,
    text: TextEncoderConfig = TINY_TEXT,
    vae: VAEConfig = TINY_VAE,
    inpaint: bool = False,
    clip_text_model_level: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """LDM-layout state dict; ``clip_text_model_level=False`` writes the older CLIP key layout."""
    u, t, v = random_sd1_models(seed, unet=unet, text=text, vae=vae, inpaint=inpaint)
    return sd1_state_dict(u, t, v, dtype, clip_text_model_level=clip_text_model_level)  # type: ignore[arg-type]


def sd1_metadata(unet: UNetConfig = TINY_UNET, text: TextEncoderConfig = TINY_TEXT) -> dict[str, str]:
    return {META_UNET_HEADS: str(unet.num_heads), META_TEXT_HEADS: str(text.num_heads)}


def write_random_sd1(
    path: str | os.PathLike[str], preset: str = "tiny", *, seed: int = 0, inpaint: bool = False, dtype: torch.dtype = torch.float32, **kw
) -> str:
    try:
        unet, text, vae = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}: {', '.join(PRESETS)}") from None
    u, t, v = random_sd1_models(seed, unet=unet, text=text, vae=vae, inpaint=inpaint)
    return save_sd1_checkpoint(path, u, t, v, dtype=dtype, **kw)  # type: ignore[arg-type]

"""Writing networks back out as a single-file SD 1.x checkpoint (the layout :mod:`engine.loading` loads)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from engine.loading import META_TEXT_HEADS, META_UNET_HEADS
from engine.unet import UNetModel
from engine.vae import AutoencoderKL


def sd1_state_dict(
    unet: UNetModel, text_encoder: CLIPTextModel, vae: AutoencoderKL, dtype: torch.dtype | None = None, *, clip_text_model_level: bool = True
) -> dict[str, torch.Tensor]:
    clip_prefix = CLIP_PREFIX + ("text_model." if clip_text_model_level else "")
    out: dict[str, torch.Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (clip_prefix, text_encoder), (VAE_PREFIX, vae)):
        for k, v in module.state_dict().items():
            if k == "embeddings.position_ids":
                continue  # a buffer, rebuilt at load
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[prefix + k] = v.contiguous()
    return out


def save_sd1_checkpoint(
    path: str | os.PathLike[str],
    unet: UNetModel,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    clip_text_model_level: bool = True,
) -> str:
    """Save in the LDM single-file layout; head counts go into metadata since no tensor shape carries them."""
    meta = {
        META_UNET_HEADS: str(unet.config.num_heads),
        META_TEXT_HEADS: str(text_encoder.config.num_attention_heads),
        **(metadata or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part"
    save_file(sd1_state_dict(unet, text_encoder, vae, dtype, clip_text_model_level=clip_text_model_level), tmp, metadata=meta)
    os.replace(tmp, path)
    return str(path)

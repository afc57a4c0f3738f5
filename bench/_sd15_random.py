"""Random-weight checkpoints in the real SD 1.x single-file layout, for the benchmarks: the model presets and the
writer (bench/engine_vs_diffusers.py, bench/gpu_throughput.py)."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["PRESETS", "make_checkpoint"]

# Plain data, so the diffusers worker never needs to import the engine (its RSS stays diffusers' own).
PRESETS: dict[str, dict] = {
    # SD 1.5: these equal engine.unet.UNetConfig(), TextEncoderConfig() (CLIP ViT-L/14) and VAEConfig() defaults.
    "full": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 320,
            "channel_mult": (1, 2, 4, 4),
            "num_res_blocks": 2,
            "attention_levels": (0, 1, 2),
            "num_heads": 8,
            "context_dim": 768,
        },
        "text": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_layers": 12, "num_heads": 12},
        "vae": {"ch": 128, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2, "z_channels": 4},
        "size": 256,
        "file": "sd15-random.safetensors",
    },
    # Same topology, narrow: a smoke run in seconds per step.
    "small": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "channel_mult": (1, 2, 4, 4),
            "num_res_blocks": 2,
            "attention_levels": (0, 1, 2),
            "num_heads": 8,
            "context_dim": 64,
        },
        "text": {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2},
        "vae": {"ch": 32, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1, "z_channels": 4},
        "size": 128,
        "file": "sd15-small-random.safetensors",
    },
}


def make_checkpoint(preset: dict, path: Path, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, file_sha256
    from engine.loading import META_TEXT_HEADS, META_UNET_HEADS
    from engine.text_encoder import TextEncoderConfig, build_text_encoder
    from engine.unet import UNetConfig, UNetModel
    from engine.vae import AutoencoderKL, VAEConfig

    ucfg = UNetConfig(**preset["unet"])
    tcfg = TextEncoderConfig(**preset["text"])
    vcfg = VAEConfig(**preset["vae"])
    with torch.device("meta"):
        nets = [
            (UNET_PREFIX, UNetModel(ucfg)),
            (CLIP_PREFIX + "text_model.", build_text_encoder(tcfg)),
            (VAE_PREFIX, AutoencoderKL(vcfg)),
        ]
    gen = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, net in nets:
        norm_params = {
            f"{mod_name}.{p_name}"
            for mod_name, mod in net.named_modules()
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm))
            for p_name, _ in mod.named_parameters(recurse=False)
        }
        for name, meta in net.state_dict().items():
            if not meta.is_floating_point():
                continue  # CLIP position_ids: rebuilt by the loader
            shape = tuple(meta.shape)
            value = torch.randn(shape, generator=gen, dtype=torch.float32)
            if name in norm_params:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * value
            elif len(shape) >= 2:
                value /= math.sqrt(math.prod(shape[1:]))  # unit-variance activations layer to layer
            else:
                value *= 0.05  # biases
            tensors[prefix + name] = value
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={META_UNET_HEADS: str(ucfg.num_heads), META_TEXT_HEADS: str(tcfg.num_heads)})
    n_params = sum(t.numel() for t in tensors.values())
    del tensors
    os.replace(tmp, path)
    file_sha256(path)  # warm the hash cache, so the timed load does not hash 4 GB
    return {"params": n_params, "bytes": path.stat().st_size}

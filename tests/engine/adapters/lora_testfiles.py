"""LoRA files for the adapter tests, written by hand in each trainer's key spelling, and the base weights of a
checkpoint as plain tensors (what the tests merge by hand)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX

# Modules of the tiny model (engine.random_checkpoint.TINY_UNET / TINY_TEXT), by diffusers name and LDM name.
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"  # width 32, context 32
ATTN_LDM = "input_blocks.1.1.transformer_blocks.0"
TE_LAYER = "text_model.encoder.layers.1"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=g) * scale


def kohya(part: str, path: str) -> str:
    """kohya's key prefix for a module path (diffusers or LDM for the U-Net, ``text_model...`` for the encoder)."""
    return {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}[part] + path.replace(".", "_")


def lora_module(stem: str, g: torch.Generator, out: int, inp: int, rank: int, *, kernel: int = 0,
                alpha: float | None = None, flat_1x1: bool = False, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors for one module: down [r, in(, k, k)], up [out, r(, 1, 1)]; ``kernel`` 1 makes the 1x1
    conv form (``flat_1x1``: without the 1x1 dims), 3 LoCon."""
    if kernel == 0 or (kernel == 1 and flat_1x1):
        down, up = randn(g, rank, inp, scale=scale), randn(g, out, rank, scale=scale)
    else:
        down, up = randn(g, rank, inp, kernel, kernel, scale=scale), randn(g, out, rank, 1, 1, scale=scale)
    t = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return t


def write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def checkpoint_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(U-Net, text encoder) tensors of a checkpoint file, named as in our networks."""
    sd = load_file(str(path))
    te_prefix = CLIP_PREFIX + "text_model."
    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    te = {k[len(te_prefix):]: v for k, v in sd.items() if k.startswith(te_prefix)}
    return unet, te


def lora_delta(t: dict[str, torch.Tensor], stem: str, shape: torch.Size, rank_alpha: bool = True) -> torch.Tensor:
    """(alpha / r) * up @ down for one kohya module, in the weight's shape: the textbook formula, written out."""
    down, up = t[f"{stem}.lora_down.weight"].double(), t[f"{stem}.lora_up.weight"].double()
    r = down.shape[0]
    alpha = float(t[f"{stem}.alpha"]) if f"{stem}.alpha" in t else 0.0
    scale = alpha / r if alpha else 1.0
    return (scale * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))).reshape(shape)


def snapshot(models) -> dict[str, torch.Tensor]:
    """Every U-Net and text-encoder parameter, copied."""
    out = {f"unet.{k}": v.detach().clone() for k, v in models.unet.named_parameters()}
    out.update({f"te.{k}": v.detach().clone() for k, v in models.text_encoder.named_parameters()})
    return out


def differing(models, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of parameters that are not bit-identical to ``before``."""
    now = snapshot(models)
    return [k for k, v in before.items() if not torch.equal(v, now[k])]

"""Adapter files written by tests, in the layouts users have them: kohya LoRAs (LDM-style names, as SDXL files and
many SD1 trainers write them) over any of our checkpoints, and A1111 / kohya textual-inversion embeddings made of a
model's own token embeddings (an embedding of the words "blurry, noise" is a real, meaningful negative embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX

# The module kinds a kohya LoRA touches in the U-Net's attention blocks.
ATTENTION_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                     "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def write_kohya_lora(path: Path, checkpoint: Path, *, rank: int = 4, alpha: float = 2.0, scale: float = 0.3, seed: int = 0,
                     text_encoder: bool = True, metadata: dict[str, str] | None = None,
                     modules: Sequence[str] = ATTENTION_MODULES) -> Path:
    """A kohya LoRA over ``checkpoint``'s attention modules (and its text encoder's), random down/up weights whose
    product is ``scale`` relative to typical weight sizes."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint), "pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}

    def add(name: str, shape: tuple[int, ...]) -> None:
        out, inp = shape[0], shape[1]
        conv = len(shape) == 4
        down = torch.randn(rank, inp, generator=gen) / inp**0.5
        up = torch.randn(out, rank, generator=gen) * scale / rank**0.5
        tensors[f"{name}.lora_down.weight"] = down[:, :, None, None] if conv else down
        tensors[f"{name}.lora_up.weight"] = up[:, :, None, None] if conv else up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)

    for key in keys:
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            path_ = key[len(UNET_PREFIX):-len(".weight")]
            if any(path_.endswith(m) for m in modules):
                add("lora_unet_" + path_.replace(".", "_"), shapes[key])
        elif text_encoder and key.startswith(CLIP_PREFIX + "text_model.encoder.layers.") and key.endswith(".weight"):
            path_ = key[len(CLIP_PREFIX):-len(".weight")]
            if any(path_.endswith(m) for m in TEXT_MODULES):
                add("lora_te_" + path_.replace(".", "_"), shapes[key])
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return path


def word_vectors(checkpoint: Path, text: str) -> torch.Tensor:
    """The token-embedding rows of ``text``'s tokens in ``checkpoint``'s text encoder: [n, width]."""
    from engine.tokenizer import load_clip_tokenizer

    ids = load_clip_tokenizer().encode(text)
    with safe_open(str(checkpoint), "pt") as f:
        table = f.get_tensor(CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
    return table[ids].float().clone()


def write_a1111_embedding(path: Path, vectors: torch.Tensor, name: str | None = None) -> Path:
    """A1111's ``.pt`` layout: ``{'string_to_param': {'*': [n, width]}, 'name', 'step'}``."""
    torch.save({"string_to_param": {"*": vectors.clone()}, "name": name or path.stem, "step": 0,
                "string_to_token": {"*": 265}}, path)
    return path


def write_safetensors_embedding(path: Path, vectors: torch.Tensor) -> Path:
    """kohya / A1111 ``.safetensors`` layout: ``{'emb_params': [n, width]}``."""
    save_file({"emb_params": vectors.contiguous()}, str(path))
    return path

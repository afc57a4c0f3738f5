"""The CLIP text encoder of SD 1.x, run through ``transformers.CLIPTextModel``.

Checkpoints keep it under ``cond_stage_model.transformer.text_model.*`` (older files omit ``text_model.``).
transformers 5 names the same tensors without the ``text_model.`` level, so loading is prefix stripping only.
The architecture is read from shapes; the head count is not in any shape, so it follows CLIP's 64-wide heads
(ViT-L/14: 768 wide, 12 heads) unless the file's metadata says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from engine.tokenizer import BOS_ID, EOS_ID

CLIP_HEAD_WIDTH = 64


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            projection_dim=self.hidden_size,
        )


def text_encoder_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> TextEncoderConfig:
    """Architecture of a CLIP text model from its (prefix-stripped, transformers-5-named) tensors."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(key)
        return sd[key]

    token = need("embeddings.token_embedding.weight")
    hidden = int(token.shape[1])
    layers = 1 + max(
        (int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")), default=-1
    )
    if layers == 0:
        raise KeyError("encoder.layers.0.self_attn.q_proj.weight")
    heads = num_heads or max(1, hidden // CLIP_HEAD_WIDTH)
    if hidden % heads:
        raise ValueError(f"text encoder width {hidden} is not divisible by {heads} heads")
    return TextEncoderConfig(
        vocab_size=int(token.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(need("encoder.layers.0.mlp.fc1.weight").shape[0]),
        num_layers=layers,
        num_heads=heads,
        max_position_embeddings=int(need("embeddings.position_embedding.weight").shape[0]),
    )


def build_text_encoder(config: TextEncoderConfig) -> CLIPTextModel:
    model = CLIPTextModel(config.to_transformers())
    model.eval()
    return model


def reset_position_ids(model: CLIPTextModel, device: torch.device | str) -> None:
    """Recreate the position-id buffer, which checkpoints do not (reliably) carry."""
    emb = model.embeddings
    n = emb.position_embedding.weight.shape[0]
    emb.register_buffer("position_ids", torch.arange(n, device=device).unsqueeze(0), persistent=False)


@torch.no_grad()
def encode_tokens(model: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states for (B, 77) token ids.

    clip_skip 1 is the last layer after the final layer norm (SD 1.x); clip_skip 2 takes the penultimate
    layer's output and applies the same final layer norm, as A1111 and ComfyUI do.
    """
    if clip_skip < 1:
        raise ValueError(f"clip skip must be >= 1, got {clip_skip}")
    n_layers = model.config.num_hidden_layers
    if clip_skip > n_layers:
        raise ValueError(f"clip skip {clip_skip} exceeds the text encoder's {n_layers} layers")
    if clip_skip == 1:
        return model(input_ids=input_ids).last_hidden_state
    out = model(input_ids=input_ids, output_hidden_states=True)
    return model.final_layer_norm(out.hidden_states[-clip_skip])

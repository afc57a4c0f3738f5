"""The CLIP text encoders of SD 1.x, SD 2.x and SDXL, run through ``transformers`` CLIP text models.

SD 1.x checkpoints keep CLIP ViT-L/14 under ``cond_stage_model.transformer.text_model.*`` (older files omit
``text_model.``). transformers 5 names the same tensors without the ``text_model.`` level, so loading is prefix
stripping only. SD 2.x and SDXL's OpenCLIP towers are renamed into the same model by :mod:`engine.open_clip`.
The architecture is read from shapes; the head count is not in any shape, so it follows CLIP's 64-wide heads
(ViT-L/14: 768 wide, 12 heads) unless the file's metadata says otherwise.

Which hidden state conditions the U-Net differs by family (:class:`Encoding`):

* SD 1.x: the last layer after the final layer norm; "clip skip n" takes layer -n, then the final norm.
* SD 2.x: the penultimate layer, then the final norm (ldm's FrozenOpenCLIPEmbedder, layer="penultimate").
* SDXL: layer -2 of both CLIP-L and bigG *without* the final norm (sgm's embedders, layer="penultimate"/"hidden");
  bigG's pooled output is its final-normed last layer at the first EOS, through ``text_projection``.

Clip skip counts from the last layer with the family's layer as the floor (Forge's ``minimal_clip_skip``, ComfyUI's
absolute layer index): "Clip skip: 2" in an SD 2.x or SDXL infotext is the family's default, not one layer deeper.
A1111 itself ignores clip skip on SD 2.x (and on SDXL unless ``sdxl_clip_l_skip`` is set), which agrees for 1 and 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from engine.tokenizer import BOS_ID, EOS_ID

CLIP_HEAD_WIDTH = 64
# OpenCLIP's tokenizer pads with 0 ("!"), after a real EOS; diffusers' SD 2.x tokenizer and SDXL's tokenizer_2
# (pad_token="!") do the same, and A1111 rewrites everything after the first EOS to 0 for these models. The padded
# positions' hidden states differ with the pad id, so it is part of how a model is encoded.
OPEN_CLIP_PAD_ID = 0

TextModel = CLIPTextModel | CLIPTextModelWithProjection


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # CLIP-L's; OpenCLIP towers use "gelu"
    projection_dim: int | None = None  # set: a CLIPTextModelWithProjection (SDXL's bigG, for the pooled output)

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            layer_norm_eps=1e-5,
            bos_token_id=BOS_ID,
            # The pooled output is read at the first position holding this id (transformers' rule since #24773,
            # and open_clip's argmax of the ids: EOS is the largest id).
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
            projection_dim=self.projection_dim or self.hidden_size,
        )


@dataclass(frozen=True)
class Encoding:
    """How a family reads a text encoder: the floor of clip skip (1 = last layer), whether the chosen layer goes
    through the final layer norm, and the id that pads a chunk after its EOS."""

    min_skip: int = 1
    final_norm: bool = True
    pad_id: int = EOS_ID


SD1_ENCODING = Encoding()
SD2_ENCODING = Encoding(min_skip=2, final_norm=True, pad_id=OPEN_CLIP_PAD_ID)
SDXL_CLIP_L_ENCODING = Encoding(min_skip=2, final_norm=False, pad_id=EOS_ID)
SDXL_CLIP_G_ENCODING = Encoding(min_skip=2, final_norm=False, pad_id=OPEN_CLIP_PAD_ID)


def text_encoder_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> TextEncoderConfig:
    """Architecture of a CLIP text model from its (prefix-stripped, transformers-5-named) tensors.

    A ``CLIPTextModelWithProjection`` state dict (names under ``text_model.`` plus ``text_projection.weight``)
    gives a config with ``projection_dim``; the activation cannot be read from shapes and stays CLIP-L's."""
    projection = sd.get("text_projection.weight")
    if projection is not None:
        sd = {k.removeprefix("text_model."): v for k, v in sd.items() if k != "text_projection.weight"}

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
        projection_dim=None if projection is None else int(projection.shape[0]),
    )


def build_text_encoder(config: TextEncoderConfig) -> TextModel:
    cls = CLIPTextModel if config.projection_dim is None else CLIPTextModelWithProjection
    model = cls(config.to_transformers())
    model.eval()
    return model


def text_transformer(model: TextModel) -> CLIPTextModel:
    """The CLIPTextModel inside either class (transformers 5 wraps it as ``text_model`` in the projection class)."""
    inner = getattr(model, "text_model", None)
    return inner if isinstance(inner, CLIPTextModel) else model  # type: ignore[return-value]


def reset_position_ids(model: TextModel, device: torch.device | str) -> None:
    """Recreate the position-id buffer, which checkpoints do not (reliably) carry."""
    emb = text_transformer(model).embeddings
    n = emb.position_embedding.weight.shape[0]
    emb.register_buffer("position_ids", torch.arange(n, device=device).unsqueeze(0), persistent=False)


def _layer(model: CLIPTextModel, clip_skip: int, min_skip: int) -> int:
    """The layer to read, counted from the last (1 = last), with the bounds checked."""
    if clip_skip < 1:
        raise ValueError(f"clip skip must be >= 1, got {clip_skip}")
    skip = max(clip_skip, min_skip)
    n_layers = model.config.num_hidden_layers
    if skip > n_layers:
        raise ValueError(f"clip skip {skip} exceeds the text encoder's {n_layers} layers")
    return skip


@torch.no_grad()
def encode_tokens(
    model: TextModel, input_ids: torch.Tensor, clip_skip: int = 1, *, final_norm: bool = True, min_skip: int = 1
) -> torch.Tensor:
    """Hidden states for (B, 77) token ids: layer ``-max(clip_skip, min_skip)``, through the final layer norm when
    ``final_norm``. The defaults are SD 1.x's (clip skip 1 = last layer after the final norm, as A1111 and ComfyUI
    do); SD 2.x passes ``min_skip=2``, SDXL ``min_skip=2, final_norm=False`` (see :class:`Encoding`)."""
    return encode_with_pooled(model, input_ids, clip_skip, final_norm=final_norm, min_skip=min_skip, pooled=False)[0]


@torch.no_grad()
def encode_with_pooled(
    model: TextModel,
    input_ids: torch.Tensor,
    clip_skip: int = 1,
    *,
    final_norm: bool = False,
    min_skip: int = 2,
    pooled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states as :func:`encode_tokens`, pooled output or None) from one forward pass. The pooled output
    (``pooled`` and a model with ``text_projection``) ignores clip skip: it is always the last layer, as in
    diffusers, Forge and ComfyUI. The defaults are SDXL's."""
    inner = text_transformer(model)
    skip = _layer(inner, clip_skip, min_skip)
    want_pooled = pooled and hasattr(model, "text_projection")
    if skip == 1 and final_norm:
        out = inner(input_ids=input_ids)
        hidden = out.last_hidden_state
    else:
        out = inner(input_ids=input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-skip]
        if final_norm:
            hidden = inner.final_layer_norm(hidden)
    return hidden, pooled_output(model, out.last_hidden_state, input_ids) if want_pooled else None  # type: ignore[arg-type]


def pooled_output(model: CLIPTextModelWithProjection, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, projection_dim): the final-normed last hidden state at each row's first EOS, through ``text_projection``.

    open_clip takes ``ids.argmax(-1)``; EOS is the largest id, and argmax returns the first maximum, so this is the
    first EOS -- also with OpenCLIP's 0 padding after it, and with embedding placeholders (id 0) before it."""
    rows = torch.arange(last_hidden.shape[0], device=last_hidden.device)
    eos = input_ids.to(last_hidden.device).argmax(dim=-1)
    return model.text_projection(last_hidden[rows, eos])

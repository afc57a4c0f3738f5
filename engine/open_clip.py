"""OpenCLIP text towers (SD 2.x ViT-H, SDXL bigG) as ``transformers`` CLIP text models.

Checkpoints keep these towers in open_clip's own layout (prefix-stripped names here):

``token_embedding.weight``            [vocab, width]
``positional_embedding``              [context, width]
``transformer.resblocks.N.ln_1/ln_2``  pre-LN norms of block N
``transformer.resblocks.N.attn.in_proj_weight/bias``  q, k and v fused along dim 0: [3 * width, width]
``transformer.resblocks.N.attn.out_proj.weight/bias``
``transformer.resblocks.N.mlp.c_fc/c_proj``  the MLP (exact GELU, not CLIP-L's quick_gelu)
``ln_final.weight/bias``
``text_projection``                   [width, proj], applied as ``x @ text_projection``
``logit_scale``                       the contrastive temperature: no part of text encoding

The architecture is the one ``transformers.CLIPTextModel`` implements (pre-LN causal transformer), so loading is
renaming: the fused ``in_proj`` tensors are split into three row blocks with ``chunk`` (views of the file's tensor,
no copy) and ``text_projection`` becomes a Linear weight through ``.T`` (a view as well). Nothing is copied at load
time; only the inverse conversion (writing a checkpoint) concatenates and transposes into new tensors.

Which tower carries a projection is the caller's choice: SD 2.x conditions on hidden states only (its file carries
``text_projection`` but nothing uses it, diffusers drops it too), SDXL's bigG also feeds its pooled, projected
output to the U-Net and so is built as ``CLIPTextModelWithProjection``, whose names sit under ``text_model.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.text_encoder import CLIP_HEAD_WIDTH, TextEncoderConfig

# Where checkpoints keep OpenCLIP towers (see engine.families.TEXT_ENCODER_PREFIXES).
SD2_PREFIX = "cond_stage_model.model."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."

OPEN_CLIP_ACT = "gelu"  # open_clip's text towers use nn.GELU (erf), as the HF configs of ViT-H and bigG say
WITH_PROJECTION_PREFIX = "text_model."  # CLIPTextModelWithProjection wraps a CLIPTextModel under this name
PROJECTION_WEIGHT = "text_projection.weight"
# OpenCLIP tensors that take no part in text encoding: dropped on load, never a reason to refuse a file.
UNUSED = frozenset({"logit_scale"})

_TOP_LEVEL = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_TOP_LEVEL_INVERSE = {v: k for k, v in _TOP_LEVEL.items()}
# Parts of a residual block that are renamed only (the fused attention input projection is split instead).
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_PARTS_INVERSE = {v: k for k, v in _BLOCK_PARTS.items()}
_QKV = ("q_proj", "k_proj", "v_proj")  # the order of the row blocks in in_proj (nn.MultiheadAttention's)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def open_clip_config(
    shapes: Mapping[str, torch.Tensor], *, num_heads: int | None = None, with_projection: bool = False
) -> TextEncoderConfig:
    """Architecture of an OpenCLIP text tower from its (prefix-stripped, OpenCLIP-named) tensors' shapes.

    Meta tensors will do. The head count is in no shape: OpenCLIP's towers use 64-wide heads (ViT-H 1024/16,
    bigG 1280/20) unless ``num_heads`` says otherwise. Raises KeyError naming a missing tensor, ValueError for
    shapes that do not fit together.
    """

    def need(key: str) -> torch.Tensor:
        if key not in shapes:
            raise KeyError(key)
        return shapes[key]

    token = need("token_embedding.weight")
    width = int(token.shape[1])
    layers = 1 + max((int(m.group(1)) for k in shapes if (m := _RESBLOCK.fullmatch(k))), default=-1)
    if layers == 0:
        raise KeyError("transformer.resblocks.0.attn.in_proj_weight")
    heads = num_heads or max(1, width // CLIP_HEAD_WIDTH)
    if width % heads:
        raise ValueError(f"text encoder width {width} is not divisible by {heads} heads")
    projection_dim = None
    if with_projection:
        projection = need("text_projection")
        if projection.ndim != 2 or int(projection.shape[0]) != width:
            raise ValueError(f"text_projection has shape {tuple(projection.shape)}; expected ({width}, projection width)")
        projection_dim = int(projection.shape[1])
    return TextEncoderConfig(
        vocab_size=int(token.shape[0]),
        hidden_size=width,
        intermediate_size=int(need("transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
        num_layers=layers,
        num_heads=heads,
        max_position_embeddings=int(need("positional_embedding").shape[0]),
        hidden_act=OPEN_CLIP_ACT,
        projection_dim=projection_dim,
    )


def open_clip_to_transformers(
    tensors: Mapping[str, torch.Tensor], *, with_projection: bool = False
) -> dict[str, torch.Tensor]:
    """OpenCLIP-named tensors -> the state-dict names of ``CLIPTextModel`` (or, ``with_projection``,
    ``CLIPTextModelWithProjection``). Every output tensor is a view of an input tensor (no copy).

    ``logit_scale`` is dropped, and ``text_projection`` too unless ``with_projection``. Names this layout does not
    know pass through unchanged, so a strict loader reports them by the file's own name.
    """
    prefix = WITH_PROJECTION_PREFIX if with_projection else ""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in _TOP_LEVEL:
            out[prefix + _TOP_LEVEL[name]] = tensor
        elif name == "text_projection":
            if with_projection:
                out[PROJECTION_WEIGHT] = tensor.T  # x @ P == Linear with weight P.T
        elif name in UNUSED:
            continue
        elif (m := _RESBLOCK.fullmatch(name)) and (part := _block_part(m.group(2))) is not None:
            layer = f"{prefix}encoder.layers.{m.group(1)}."
            if part in ("weight", "bias"):  # the fused in_proj
                if tensor.shape[0] % 3:
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}: not three stacked projections")
                for proj, piece in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{proj}.{part}"] = piece
            else:
                out[layer + part] = tensor
        else:
            out[name] = tensor
    return out


def _block_part(rest: str) -> str | None:
    """The transformers name of a block member ("weight"/"bias" for the fused in_proj); None if unknown."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return rest.rsplit("_", 1)[1]
    stem, _, last = rest.rpartition(".")
    if stem in _BLOCK_PARTS and last in ("weight", "bias"):
        return f"{_BLOCK_PARTS[stem]}.{last}"
    return None


def transformers_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: a ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict -> OpenCLIP names
    (prefix-free; the caller adds the checkpoint's prefix). q/k/v are concatenated back into ``in_proj_*`` and the
    projection transposed, into new contiguous tensors (safetensors writes nothing else).

    SD 2.x files also carry ``text_projection`` and ``logit_scale``, which a plain ``CLIPTextModel`` has no tensor
    for; a writer that wants the full layout adds them itself. Raises ValueError for a name it cannot place.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for full, tensor in state_dict.items():
        if full == PROJECTION_WEIGHT:
            out["text_projection"] = tensor.T.contiguous()
            continue
        name = full.removeprefix(WITH_PROJECTION_PREFIX)
        if name == "embeddings.position_ids":
            continue  # a buffer some versions save; OpenCLIP has none
        if name in _TOP_LEVEL_INVERSE:
            out[_TOP_LEVEL_INVERSE[name]] = tensor
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            raise ValueError(f"no OpenCLIP name for text encoder tensor {full!r}")
        block, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
        stem, _, last = rest.rpartition(".")
        attn, _, proj = stem.partition(".")
        if attn == "self_attn" and proj in _QKV and last in ("weight", "bias"):
            fused.setdefault((block, last), {})[proj] = tensor
        elif stem in _BLOCK_PARTS_INVERSE and last in ("weight", "bias"):
            out[f"{block}{_BLOCK_PARTS_INVERSE[stem]}.{last}"] = tensor
        else:
            raise ValueError(f"no OpenCLIP name for text encoder tensor {full!r}")
    for (block, last), parts in fused.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"{block}: self_attn.{missing[0]}.{last} is missing, so in_proj_{last} cannot be built")
        out[f"{block}attn.in_proj_{last}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


@dataclass(frozen=True)
class OpenClipSource:
    """Where a transformers tensor of a converted tower comes from in the file: the OpenCLIP name, which third of
    a fused ``in_proj`` tensor (0 q, 1 k, 2 v) or None, and whether it is stored transposed.

    For error messages that must name the file's key, and for re-reading a parameter's base value from the file
    (undoing a merged LoRA): ``source.take(file_tensor)`` is the parameter's value."""

    key: str
    third: int | None = None
    transposed: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.third is not None:
            tensor = tensor.chunk(3, dim=0)[self.third]
        return tensor.T if self.transposed else tensor


def open_clip_source(name: str) -> OpenClipSource:
    """The :class:`OpenClipSource` of a transformers state-dict name (either model class). ValueError if none."""
    if name == PROJECTION_WEIGHT:
        return OpenClipSource("text_projection", transposed=True)
    bare = name.removeprefix(WITH_PROJECTION_PREFIX)
    if bare in _TOP_LEVEL_INVERSE:
        return OpenClipSource(_TOP_LEVEL_INVERSE[bare])
    m = _LAYER.fullmatch(bare)
    if m is not None:
        block, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
        stem, _, last = rest.rpartition(".")
        attn, _, proj = stem.partition(".")
        if attn == "self_attn" and proj in _QKV and last in ("weight", "bias"):
            return OpenClipSource(f"{block}attn.in_proj_{last}", third=_QKV.index(proj))
        if stem in _BLOCK_PARTS_INVERSE and last in ("weight", "bias"):
            return OpenClipSource(f"{block}{_BLOCK_PARTS_INVERSE[stem]}.{last}")
    raise ValueError(f"no OpenCLIP source for text encoder tensor {name!r}")

"""Textual-inversion embedding files: the layouts A1111 users have, read without running a pickle's code.

Layouts (A1111 ``modules/textual_inversion/textual_inversion.py`` accepts the same ones):

* A1111 ``.pt``/``.bin``: ``{'string_to_param': {'*': [n, w]}, 'name': ..., 'step': ..., ...}``;
* kohya ``.safetensors``: ``{'emb_params': [n, w]}``;
* diffusers (``learned_embeds.bin`` / ``.safetensors``): ``{token: [w] or [n, w]}``, one tensor;
* SDXL: ``{'clip_l': [n, 768], 'clip_g': [n, 1280]}``, one set of vectors per text encoder.

Pickled files are read only with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers come back, anything that would construct another Python object is refused with a one-line reason.
A file's sizes are bounded before its values are used: an embedding is at most 75 vectors (one prompt chunk),
and a file far bigger than any embedding (a LoRA or a checkpoint under the wrong name) is refused unread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.adapters.refs import AdapterError, AdapterFile
from engine.checkpoint import CheckpointError, file_sha256, load_weights_only, open_state_dict, weights_only_refusal
from engine.tokenizer import CHUNK_TOKENS

MAX_VECTORS = CHUNK_TOKENS  # A1111 embeddings must fit one 75-token chunk; real ones have 1-75 vectors
# 75 vectors x (768 + 1280) floats x 4 bytes is 0.6 MB; anything near this limit is not an embedding.
MAX_FILE_BYTES = 16 * 1024 * 1024
PICKLE_SUFFIXES = frozenset({".pt", ".bin", ".pth"})
SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
# Width of the text encoder each family's embeddings are trained for (SDXL's files carry two parts).
WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}
SDXL_PARTS = ("clip_l", "clip_g")
SDXL_PART_LABELS = {"clip_l": "CLIP-L", "clip_g": "OpenCLIP bigG"}


@dataclass(frozen=True)
class Embedding:
    """An embedding ready for prompts: ``vectors`` (n, width) float32 on the CPU; ``name`` is what prompts say."""

    name: str
    vectors: torch.Tensor
    file: AdapterFile

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])


# What a prompt name maps to: an Embedding for one-encoder models, {part: Embedding} for SDXL's.
ModelEmbedding = Embedding | dict[str, Embedding]


@dataclass(frozen=True)
class EmbeddingInfo:
    """What ``adforge models inspect`` shows of an embedding file, read without a model."""

    path: str
    name: str
    format: str  # "a1111" | "kohya" | "diffusers" | "sdxl"
    vectors: int
    parts: dict[str, int] = field(default_factory=dict)  # part -> width: {"": 768} or {"clip_l": 768, "clip_g": 1280}
    family: str | None = None  # a guess from the widths
    step: int | None = None  # training steps, when the trainer wrote them
    trained_name: str | None = None  # the name the trainer gave it (prompts use the file's stem)
    checkpoint_name: str | None = None  # the checkpoint A1111 trained it on, when recorded

    @property
    def width(self) -> int | None:
        """The vector width of a one-encoder embedding; None for SDXL's two-part files."""
        return self.parts.get("")


@dataclass
class _Parsed:
    format: str
    parts: dict[str, torch.Tensor]
    step: int | None = None
    trained_name: str | None = None
    checkpoint_name: str | None = None


def _width_text(width: int) -> str:
    family = WIDTH_FAMILIES.get(width)
    return f"{width} wide" + (f" ({family})" if family else "")


def _check_shape(path: Path, key: str, shape: tuple[int, ...]) -> None:
    # Checked on shapes alone, before a value is read: a crafted 10^6-vector file costs nothing.
    if len(shape) not in (1, 2):
        raise AdapterError(path, f"embedding vectors must be 1-D or 2-D, found shape {list(shape)}", key)
    n = 1 if len(shape) == 1 else shape[0]
    if n == 0 or shape[-1] == 0:
        raise AdapterError(path, "the embedding holds no vectors", key)
    if n > MAX_VECTORS:
        raise AdapterError(
            path, f"holds {n} vectors; an embedding has at most {MAX_VECTORS} (it must fit one 75-token prompt chunk)", key
        )


def _vectors(path: Path, key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AdapterError(path, f"expected a tensor of vectors, found {type(value).__name__}", key)
    _check_shape(path, key, tuple(value.shape))
    if not value.is_floating_point():
        raise AdapterError(path, f"embedding vectors must be floating point, found {value.dtype}", key)
    vectors = value.detach().reshape(-1, value.shape[-1]).to(torch.float32).clone()
    if not torch.isfinite(vectors).all():
        raise AdapterError(path, "the embedding holds NaN or infinite values (a broken training run?)", key)
    return vectors


def _optional(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _interpret(path: Path, data: Any) -> _Parsed:
    if not isinstance(data, Mapping):
        raise AdapterError(path, f"not a textual-inversion embedding (the file holds a {type(data).__name__}, not a dict)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise AdapterError(path, "string_to_param must hold exactly one entry (A1111 embeddings hold one term)")
        (key, value), = params.items()
        return _Parsed(
            "a1111",
            {"": _vectors(path, f"string_to_param.{key}", value)},
            step=_optional(data, "step", int),
            trained_name=_optional(data, "name", str),
            checkpoint_name=_optional(data, "sd_checkpoint_name", str),
        )
    if all(part in data for part in SDXL_PARTS):
        parts = {part: _vectors(path, part, data[part]) for part in SDXL_PARTS}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise AdapterError(path, "clip_l and clip_g hold different numbers of vectors")
        return _Parsed("sdxl", parts)
    if len(data) == 1:
        (key, value), = data.items()
        return _Parsed("kohya" if key == "emb_params" else "diffusers", {"": _vectors(path, str(key), value)})
    keys = list(data)
    shown = ", ".join(repr(k)[:60] for k in keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
    hint = " It looks like a LoRA: put it in the LoRA folder." if any("lora" in str(k) for k in keys) else ""
    raise AdapterError(
        path,
        "not a textual-inversion embedding: expected string_to_param (A1111), emb_params (kohya), clip_l/clip_g "
        f"(SDXL) or one {{token: tensor}} entry (diffusers); found {shown}.{hint}",
    )


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        sd = open_state_dict(path)
        for key in sd:
            _check_shape(path, key, sd.shape(key))  # only single-term files reach _vectors; check all first
        return {key: sd[key] for key in sd}
    except CheckpointError as exc:
        raise AdapterError(None, str(exc)) from exc  # the message already names the file


def _load_pickle(path: Path) -> Any:
    try:
        return load_weights_only(path)
    except Exception as exc:  # torch raises many types for bad or hostile pickles
        raise AdapterError(path, f"cannot be read as an embedding: {weights_only_refusal(exc)}; convert it to .safetensors") from exc


def _read(path: Path, allow_pickle: bool) -> _Parsed:
    if not path.is_file():
        raise AdapterError(path, "embedding file not found" if not path.exists() else "is not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise AdapterError(
            path, f"is {size / 2**20:.0f} MB; a textual-inversion embedding is under 1 MB (is it a LoRA or a checkpoint?)"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _interpret(path, _load_safetensors(path))
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterError(path, f"{suffix} embeddings are Python pickles and are refused here; convert to .safetensors")
        return _interpret(path, _load_pickle(path))
    raise AdapterError(path, f"unknown embedding file type {suffix!r} (expected .pt, .bin or .safetensors)")


def check_sha256(file: AdapterFile) -> None:
    """Fail unless the file on disk is the one whose sha256 the caller recorded (no-op without a recorded hash)."""
    if not file.sha256:
        return
    actual = file_sha256(file.path)
    if actual != file.sha256.lower():
        raise AdapterError(
            file.path, f"sha256 is {actual[:12]}..., expected {file.sha256[:12]}...: the file changed since it was recorded"
        )


def read_embedding(file: AdapterFile, *, width: int, allow_pickle: bool = True) -> Embedding:
    """The embedding in ``file`` for a text encoder ``width`` wide; AdapterError names the file and the problem."""
    path = Path(file.path)
    if not path.is_file():
        raise AdapterError(path, "embedding file not found" if not path.exists() else "is not a file")
    check_sha256(file)
    parsed = _read(path, allow_pickle)
    if parsed.format == "sdxl":
        l_width, g_width = (int(parsed.parts[p].shape[1]) for p in SDXL_PARTS)
        raise AdapterError(
            path, f"the embedding is for SDXL (clip_l {l_width} + clip_g {g_width} wide); "
                  f"this model's text encoder is {_width_text(width)}"
        )
    vectors = parsed.parts[""]
    if vectors.shape[1] != width:
        raise AdapterError(
            path, f"embedding vectors are {_width_text(int(vectors.shape[1]))}; this model's text encoder is {_width_text(width)}"
        )
    return Embedding(file.name, vectors, file)


def read_sdxl_embedding(file: AdapterFile, *, widths: Mapping[str, int], allow_pickle: bool = True) -> dict[str, Embedding]:
    """The parts of an SDXL embedding ``{"clip_l": Embedding, "clip_g": Embedding}`` for a model whose text encoders
    are ``widths`` wide (``{"clip_l": 768, "clip_g": 1280}``; the refiner: ``{"clip_g": 1280}``), each part's width
    checked against its encoder. Only the parts the model has come back. AdapterError names the file and the widths."""
    path = Path(file.path)
    if not path.is_file():
        raise AdapterError(path, "embedding file not found" if not path.exists() else "is not a file")
    check_sha256(file)
    parsed = _read(path, allow_pickle)
    model = " + ".join(f"{part} {w}" for part, w in widths.items())
    if parsed.format != "sdxl":
        width = int(parsed.parts[""].shape[1])
        raise AdapterError(
            path, f"the embedding is for SD 1.x/2.x (one set of vectors, {_width_text(width)}); this SDXL model needs "
                  f"clip_l and clip_g vectors (its text encoders are {model} wide)"
        )
    found = {part: int(parsed.parts[part].shape[1]) for part in SDXL_PARTS}
    for part, width in widths.items():
        if part not in found:
            raise AdapterError(path, f"unknown text encoder part {part!r} (SDXL parts are {', '.join(SDXL_PARTS)})")
        if found[part] != width:
            have = " + ".join(f"{p} {w}" for p, w in found.items())
            raise AdapterError(
                path, f"{part} vectors are {found[part]} wide but this model's {SDXL_PART_LABELS[part]} text encoder is "
                      f"{width} wide: the embedding ({have}) is for another model (this one: {model})", part
            )
    return {part: Embedding(file.name, parsed.parts[part], file) for part in widths}


def encoder_widths(models: Any) -> dict[str, int]:
    """The embedding parts a loaded model (``engine.loading.LoadedModels``) takes and their widths: ``{"": width}``
    for one-encoder families, ``{"clip_l": .., "clip_g": ..}`` for SDXL, ``{"clip_g": ..}`` for the SDXL refiner."""
    width = int(models.text_encoder.config.hidden_size)
    if getattr(models, "text_encoder_2", None) is not None:
        return {"clip_l": width, "clip_g": int(models.text_encoder_2.config.hidden_size)}
    if models.family.name == "sdxl-refiner":
        return {"clip_g": width}
    return {"": width}


def read_model_embedding(file: AdapterFile, widths: Mapping[str, int], *, allow_pickle: bool = True) -> ModelEmbedding:
    """What a prompt name maps to for a model whose parts are ``widths`` (:func:`encoder_widths`): an
    :class:`Embedding` for one-encoder models, the SDXL parts ``{part: Embedding}`` otherwise."""
    if set(widths) == {""}:
        return read_embedding(file, width=widths[""], allow_pickle=allow_pickle)
    return read_sdxl_embedding(file, widths=widths, allow_pickle=allow_pickle)


def describe_embedding(path: str | os.PathLike[str], *, allow_pickle: bool = True) -> EmbeddingInfo:
    """Format, vector count, widths and training facts of an embedding file, for ``adforge models inspect``."""
    p = Path(path)
    parsed = _read(p, allow_pickle)
    parts = {part: int(v.shape[1]) for part, v in parsed.parts.items()}
    family = "SDXL" if parsed.format == "sdxl" else WIDTH_FAMILIES.get(parts[""])
    n = int(next(iter(parsed.parts.values())).shape[0])
    return EmbeddingInfo(
        path=str(p), name=p.stem, format=parsed.format, vectors=n, parts=parts, family=family,
        step=parsed.step, trained_name=parsed.trained_name, checkpoint_name=parsed.checkpoint_name,
    )

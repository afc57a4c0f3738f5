"""Writing networks back out as a single-file checkpoint in the layout real files have (what :mod:`engine.loading`
loads): SD 1.x (LDM), SD 2.x (LDM with the OpenCLIP-H tower) and SDXL (SGM "conditioner" layout).

Each ``*_state_dict`` function returns the file's tensors by their full keys; :func:`save_checkpoint` writes them
atomically with metadata. :class:`SafetensorsWriter` writes the same file format from a header given up front and
then one tensor at a time, in any order, so a file of many gigabytes never has to be held in memory whole. Our networks keep the checkpoint's own names (U-Net, VAE, CLIP-L), so writing is adding a
prefix; only the OpenCLIP towers are renamed back by :func:`engine.open_clip.transformers_to_open_clip`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from types import TracebackType

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from engine.loading import META_TEXT_HEADS, META_UNET_HEAD_CHANNELS, META_UNET_HEADS, SDXL_CLIP_L_PREFIX
from engine.open_clip import SD2_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_REFINER_CLIP_G_PREFIX, transformers_to_open_clip
from engine.text_encoder import CLIP_HEAD_WIDTH, TextModel
from engine.unet import UNetModel
from engine.vae import AutoencoderKL

__all__ = [
    "OPEN_CLIP_LOGIT_SCALE", "SafetensorsWriter", "checkpoint_metadata", "save_checkpoint", "save_sd1_checkpoint", "sd1_state_dict",
    "sd2_state_dict", "sdxl_state_dict",
]

# Trained CLIP models end with logit_scale = log(100) (the clamp open_clip trains against); nothing in text encoding
# reads it, but real SD 2.x / SDXL files carry it as a 0-d tensor.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)


def _prefixed(prefix: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith("embeddings.position_ids"):
            continue  # a buffer, rebuilt at load
        v = v.detach()
        if not v.is_meta:  # meta tensors stand for a file's layout (SafetensorsWriter's header): they stay meta
            v = v.cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[prefix + k] = v.contiguous()  # safetensors writes contiguous tensors only
    return out


def sd1_state_dict(
    unet: UNetModel, text_encoder: CLIPTextModel, vae: AutoencoderKL, dtype: torch.dtype | None = None, *, clip_text_model_level: bool = True
) -> dict[str, torch.Tensor]:
    clip_prefix = CLIP_PREFIX + ("text_model." if clip_text_model_level else "")
    out: dict[str, torch.Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (clip_prefix, text_encoder), (VAE_PREFIX, vae)):
        out |= _prefixed(prefix, module.state_dict(), dtype)
    return out


def _open_clip_tower(model: TextModel, text_projection: torch.Tensor | None, logit_scale: float) -> dict[str, torch.Tensor]:
    """A transformers text model in open_clip's layout, with ``text_projection`` (``x @ P``, [width, proj]) and the
    0-d ``logit_scale`` that open_clip's text tower files always hold."""
    tower = transformers_to_open_clip(model.state_dict())
    width = model.config.hidden_size
    if "text_projection" not in tower:
        # SD 2.x: the projection takes no part in conditioning (our loader drops it), but real files carry one; the
        # identity stands in for it when the caller has none.
        proj = torch.eye(width) if text_projection is None else text_projection
        if proj.ndim != 2 or proj.shape[0] != width:
            raise ValueError(f"text_projection has shape {tuple(proj.shape)}; expected ({width}, projection width)")
        tower["text_projection"] = proj
    elif text_projection is not None:
        raise ValueError("the text encoder has its own text_projection; do not pass another")
    tower["logit_scale"] = torch.tensor(float(logit_scale))
    return tower


def sd2_state_dict(
    unet: UNetModel,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    dtype: torch.dtype | None = None,
    *,
    text_projection: torch.Tensor | None = None,
    logit_scale: float = OPEN_CLIP_LOGIT_SCALE,
) -> dict[str, torch.Tensor]:
    """SD 2.x (also 2.x inpainting): U-Net under ``model.diffusion_model.``, the OpenCLIP-H tower (given as the
    transformers model our loader builds) under ``cond_stage_model.model.`` in open_clip's names with
    ``text_projection`` [width, proj] (identity if None) and ``logit_scale``, the VAE under ``first_stage_model.``."""
    out = _prefixed(UNET_PREFIX, unet.state_dict(), dtype)
    out |= _prefixed(SD2_PREFIX, _open_clip_tower(text_encoder, text_projection, logit_scale), dtype)
    out |= _prefixed(VAE_PREFIX, vae.state_dict(), dtype)
    return out


def sdxl_state_dict(
    unet: UNetModel,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    vae: AutoencoderKL,
    dtype: torch.dtype | None = None,
    *,
    logit_scale: float = OPEN_CLIP_LOGIT_SCALE,
) -> dict[str, torch.Tensor]:
    """SDXL base: U-Net and VAE as in LDM files, CLIP-L under ``conditioner.embedders.0.transformer.text_model.``
    (transformers' names), bigG under ``conditioner.embedders.1.model.`` in open_clip's names, its
    ``text_projection`` (which gives the pooled output) included."""
    if not hasattr(text_encoder_2, "text_projection"):
        raise ValueError("SDXL's second text encoder needs its text_projection (a CLIPTextModelWithProjection)")
    out = _prefixed(UNET_PREFIX, unet.state_dict(), dtype)
    out |= _prefixed(SDXL_CLIP_L_PREFIX + "text_model.", text_encoder.state_dict(), dtype)
    out |= _prefixed(SDXL_CLIP_G_PREFIX, _open_clip_tower(text_encoder_2, None, logit_scale), dtype)
    out |= _prefixed(VAE_PREFIX, vae.state_dict(), dtype)
    return out


def sdxl_refiner_state_dict(unet: UNetModel, text_encoder: CLIPTextModelWithProjection, vae: AutoencoderKL,
                            dtype: torch.dtype | None = None, *, logit_scale: float = OPEN_CLIP_LOGIT_SCALE) -> dict[str, torch.Tensor]:
    """The SDXL refiner: U-Net and VAE as in LDM files, bigG alone (its first embedder) under
    ``conditioner.embedders.0.model.`` in open_clip's names, with its ``text_projection``."""
    out = _prefixed(UNET_PREFIX, unet.state_dict(), dtype)
    out |= _prefixed(SDXL_REFINER_CLIP_G_PREFIX, _open_clip_tower(text_encoder, None, logit_scale), dtype)
    out |= _prefixed(VAE_PREFIX, vae.state_dict(), dtype)
    return out


def checkpoint_metadata(unet: UNetModel, text_encoders: Iterable[TextModel], *, always_text_heads: bool = False) -> dict[str, str]:
    """The architecture facts no tensor shape carries, for the loader: the U-Net's head width (SD 2.x / SDXL style) or
    head count, and the text encoders' head count. Text heads are written only where they are not CLIP's 64-wide
    default (or ``always_text_heads``); the loader reads one count for all of a file's text encoders, so encoders
    that need different non-default counts cannot be described and raise ValueError."""
    cfg = unet.config
    meta = ({META_UNET_HEAD_CHANNELS: str(cfg.num_head_channels)} if cfg.num_head_channels > 0
            else {META_UNET_HEADS: str(cfg.num_heads)})
    encoders = [(m.config.hidden_size, m.config.num_attention_heads) for m in text_encoders]
    if always_text_heads or any(heads != max(1, width // CLIP_HEAD_WIDTH) for width, heads in encoders):
        counts = {heads for _, heads in encoders}
        if len(counts) != 1:
            raise ValueError(f"text encoders with head counts {sorted(counts)} cannot share the one metadata entry "
                             f"{META_TEXT_HEADS}: give them the same count, or CLIP's {CLIP_HEAD_WIDTH}-wide heads")
        meta[META_TEXT_HEADS] = str(counts.pop())
    return meta


def save_checkpoint(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file atomically (a half-written file never carries the final name)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part"
    save_file(dict(tensors), tmp, metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return str(path)


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
    return save_checkpoint(path, sd1_state_dict(unet, text_encoder, vae, dtype, clip_text_model_level=clip_text_model_level), meta)


# ---- streaming writer ---------------------------------------------------------------------------------------

# torch dtype -> (safetensors name, rank). safetensors' own writer orders the data section by dtype, widest rank first,
# then by name; the ranks follow the declaration order of its Rust Dtype enum, so our files come out in its order.
_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2), torch.float8_e5m2: ("F8_E5M2", 3),
    torch.float8_e4m3fn: ("F8_E4M3", 4), torch.int16: ("I16", 5), torch.uint16: ("U16", 6), torch.float16: ("F16", 7),
    torch.bfloat16: ("BF16", 8), torch.int32: ("I32", 9), torch.uint32: ("U32", 10), torch.float32: ("F32", 11),
    torch.float64: ("F64", 12), torch.int64: ("I64", 13), torch.uint64: ("U64", 14),
}
_HEADER_ALIGN = 8  # safetensors pads the JSON header with spaces so that the data starts 8-byte aligned


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the layout (names, dtypes, shapes; tensors or meta tensors) is
    fixed up front, then every tensor is :meth:`write`-n once, in any order, to its place in the file.

    Atomic like :func:`save_checkpoint`: bytes go to ``<path>.part``, renamed to ``path`` by :meth:`close` only once
    every tensor has been written; an exception inside ``with`` removes the partial file. The bytes equal
    ``safetensors.torch.save_file``'s for the same tensors, except that metadata keys come in sorted order (its
    writer emits them in hash order, which varies from run to run).
    """

    def __init__(self, path: str | os.PathLike[str], layout: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None):
        self.path = str(path)
        entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name, t in layout.items():
            if name == "__metadata__" or not isinstance(name, str):
                raise ValueError(f"{name!r} cannot name a tensor in a safetensors file")
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
            entries[name] = (t.dtype, tuple(int(d) for d in t.shape))
        order = sorted(entries, key=lambda n: (-_DTYPES[entries[n][0]][1], n))
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
        self._slots: dict[str, tuple[int, int]] = {}  # name -> (start, end) within the data section
        offset = 0
        for name in order:
            dtype, shape = entries[name]
            size = math.prod(shape) * dtype.itemsize
            self._slots[name] = (offset, offset + size)
            header[name] = {"dtype": _DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % _HEADER_ALIGN)
        self._entries = entries
        self._data_start = 8 + len(raw)
        self.pending: set[str] = set(entries)  # not written yet
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._tmp = f"{self.path}.part"
        self._file = open(self._tmp, "wb")
        try:
            self._file.write(struct.pack("<Q", len(raw)) + raw)
            # The full size up front: tensors may then arrive in any order (the gaps read as zeros until filled).
            self._file.truncate(self._data_start + offset)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``name``'s bytes; its dtype and shape must be the layout's, and each name is written once."""
        if name not in self._entries:
            raise KeyError(f"{name!r} is not in this file's layout")
        if name not in self.pending:
            raise ValueError(f"tensor {name!r} was already written")
        dtype, shape = self._entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the header says "
                             f"{dtype} {shape}")
        if tensor.is_meta:
            raise ValueError(f"tensor {name!r} is a meta tensor: it has no data to write")
        start, end = self._slots[name]
        if end > start:
            # A flat byte view of a contiguous CPU tensor: written without another copy (x86/ARM are little-endian,
            # as the format is).
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.seek(self._data_start + start)
            self._file.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> str:
        """Finish the file under its final name; refuses (and removes the partial file) if a tensor is missing."""
        if self.pending:
            missing = sorted(self.pending)
            self.abort()
            raise ValueError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]!r}; {self.path} not written")
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.close()
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

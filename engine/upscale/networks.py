"""Super-resolution model files (ESRGAN family, Real-ESRGAN compact, SPAN, SwinIR, ... whatever spandrel knows).

Users bring the files (``RealESRGAN_x4plus.pth``, ``4x-UltraSharp.safetensors``); nothing is ever downloaded.
Files are read without running code: ``.safetensors`` through the same header checks as checkpoints,
``.pth`` / ``.pt`` with ``torch.load(weights_only=True)`` only (PyTorch's restricted unpickler: tensors and
plain containers, no arbitrary objects). spandrel then recognises the architecture from the tensor names and
shapes and builds the network; the scale is read from the model, never from the file name.

A loaded upscaler is kept per process (:func:`load_upscaler`), keyed by file, content hash, device and dtype.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from engine.checkpoint import CheckpointError, a1111_short_hash, file_sha256, open_state_dict, weights_only_refusal
from engine.image_ops import pil_to_tensor01, tensor01_to_pil
from engine.upscale.chain import MODEL_SUFFIXES, lanczos_size
from engine.tiling import resolve_tile, run_tiled

__all__ = ["ModelUpscaler", "UpscalerError", "UpscalerInfo", "clear_upscalers", "inspect_upscaler", "lanczos",
           "load_upscaler", "read_upscaler_state_dict"]

DEFAULT_TILE = 512  # input pixels: a 4x model then writes 2048 x 2048 per tile
DEFAULT_OVERLAP = 32  # input pixels on each shared edge; covers most of an ESRGAN's receptive field
ProgressFn = Callable[[int, int], None]


class UpscalerError(ValueError):
    """An upscaler file that cannot be used; the message starts with the file."""

    def __init__(self, path: str | os.PathLike[str], message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class UpscalerInfo:
    path: str
    name: str
    sha256: str
    arch: str  # spandrel's architecture name, e.g. "ESRGAN", "RealESRGAN Compact"
    scale: int
    purpose: str  # "SR" or "Restoration" (scale 1)
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def short_hash(self) -> str:
        return a1111_short_hash(self.sha256)


def read_upscaler_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, file metadata) of an upscaler file, read without executing anything from it."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise UpscalerError(p, f"not an upscaler model file (expected {', '.join(MODEL_SUFFIXES)})")
    if not p.is_file():
        raise UpscalerError(p, "no such upscaler file")
    if suffix in (".safetensors", ".sft"):
        try:
            sd = open_state_dict(p)
        except CheckpointError as exc:
            raise UpscalerError(p, str(exc).removeprefix(f"{p}: ")) from None
        return {k: sd[k] for k in sd}, dict(sd.metadata)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals, TorchScript archives, truncated zips all land here
        raise UpscalerError(p, f"cannot be read as a weights-only PyTorch file: {weights_only_refusal(exc)}; upscaler "
                               ".pth files are only ever read weights-only (a pickle can run code), so TorchScript and "
                               "pickled objects are refused: convert it to .safetensors") from None
    from spandrel import canonicalize_state_dict

    if not isinstance(obj, dict):
        raise UpscalerError(p, f"holds a {type(obj).__name__}, not a state dict of tensors")
    sd = canonicalize_state_dict(obj)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UpscalerError(p, "does not hold a state dict of tensors")
    return dict(sd), {}


def _describe(p: Path, state_dict: dict[str, torch.Tensor]):
    """spandrel's model descriptor for ``state_dict``; UpscalerError unless it is an RGB image-to-image model."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        descriptor = ModelLoader(device="cpu").load_from_state_dict(state_dict)
    except UnsupportedModelError:
        raise UpscalerError(p, "spandrel does not recognise this architecture (not a super-resolution model it "
                               "supports; an SD checkpoint, LoRA or VAE is not an upscaler)") from None
    except Exception as exc:  # a known architecture with inconsistent tensors
        raise UpscalerError(p, f"cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise UpscalerError(p, f"is a {descriptor.architecture.name} model for {descriptor.purpose}, not super-resolution")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerError(p, f"works on {descriptor.input_channels}-channel images, not RGB")
    return descriptor


def inspect_upscaler(path: str | os.PathLike[str]) -> UpscalerInfo:
    """Architecture, scale and hashes of an upscaler file (builds the network once on the CPU to be sure)."""
    p = Path(path)
    sd, metadata = read_upscaler_state_dict(p)
    descriptor = _describe(p, sd)
    sha = file_sha256(p)
    return UpscalerInfo(path=str(p.resolve()), name=metadata.get("modelspec.title") or p.stem, sha256=sha,
                        arch=descriptor.architecture.name, scale=int(descriptor.scale), purpose=descriptor.purpose,
                        metadata=metadata)


class ModelUpscaler:
    """A loaded upscaler: ``upscale(image)`` returns the image ``scale`` times larger."""

    def __init__(self, info: UpscalerInfo, descriptor, device: torch.device, dtype: torch.dtype):
        self.info = info
        self.descriptor = descriptor
        self.device = device
        self.dtype = dtype

    @property
    def scale(self) -> int:
        return self.info.scale

    def upscale_tensor(self, x01: torch.Tensor, *, tile: int | None = None, overlap: int | None = None,
                       progress: ProgressFn | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H*s, W*s) float32 on the CPU. ``tile`` (input pixels): None = tile
        when the output is above AUTO_TILE_PIXELS, 0 = never; tiles (at most ``tile``, shrunk to the fewest that
        cover the image) overlap by ``overlap`` and are feathered."""
        b, _, h, w = x01.shape
        size = resolve_tile(tile, h * w * self.scale**2, DEFAULT_TILE)
        if size is None:
            return self._run(x01)
        ov = DEFAULT_OVERLAP if overlap is None else overlap
        ov = min(ov, max(0, size // 2 - 1))
        # The output stays on the CPU: on a GPU, memory is then bounded by one tile whatever the image size.
        return run_tiled(x01, lambda part, _: self._run(part), tile=size, overlap=ov, scale=self.scale,
                         out_device="cpu", progress=progress, balance=True)

    def _run(self, x01: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.descriptor(x01.to(device=self.device, dtype=self.dtype))
        return out.float().cpu()

    def upscale(self, image: Image.Image, *, tile: int | None = None, overlap: int | None = None,
                progress: ProgressFn | None = None) -> Image.Image:
        x = pil_to_tensor01(image)[None]
        out = self.upscale_tensor(x, tile=tile, overlap=overlap, progress=progress)[0]
        return tensor01_to_pil(out)


_CACHE: dict[tuple, ModelUpscaler] = {}
_LOCK = threading.Lock()


def _auto_dtype(descriptor, device: torch.device) -> torch.dtype:
    if device.type == "cuda" and descriptor.supports_half:
        return torch.float16
    return torch.float32


def load_upscaler(path: str | os.PathLike[str], *, sha256: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> ModelUpscaler:
    """The upscaler in ``path``, loaded once per process. ``sha256`` (a chain's pin) must match the file's
    content, else UpscalerError: a chain that names a file by hash never runs another file."""
    p = Path(path)
    if not p.is_file():
        raise UpscalerError(p, "no such upscaler file")
    actual = file_sha256(p)
    if sha256 and actual != sha256.lower():
        raise UpscalerError(p, f"has sha256 {actual}, but the chain pins {sha256.lower()} (the file changed or is another one)")
    dev = torch.device(device)
    key = (str(p.resolve()), actual, str(dev), dtype)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        sd, metadata = read_upscaler_state_dict(p)
        descriptor = _describe(p, sd)
        del sd
        info = UpscalerInfo(path=str(p.resolve()), name=metadata.get("modelspec.title") or p.stem, sha256=actual,
                            arch=descriptor.architecture.name, scale=int(descriptor.scale), purpose=descriptor.purpose,
                            metadata=metadata)
        use_dtype = dtype or _auto_dtype(descriptor, dev)
        descriptor.to(dev).to(use_dtype).eval()
        upscaler = ModelUpscaler(info, descriptor, dev, use_dtype)
        _CACHE[key] = upscaler
        return upscaler


def clear_upscalers() -> None:
    with _LOCK:
        _CACHE.clear()


def lanczos(image: Image.Image, scale: float) -> Image.Image:
    """Pillow's Lanczos resize by ``scale`` (each side rounded, at least 1 pixel)."""
    return image.convert("RGB").resize(lanczos_size(image.width, image.height, scale), Image.Resampling.LANCZOS)

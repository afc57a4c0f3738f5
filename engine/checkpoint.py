"""Opening model files: safetensors (memory-mapped) or, on request, pickled .ckpt; hashes.

Nothing here builds a network; :mod:`engine.loading` does that from the state dicts opened here, after
:mod:`engine.families` has said what the file is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# A safetensors header is JSON of a few hundred KB even for SDXL (LoRA training metadata adds a few hundred more); the
# length is checked before a byte of JSON is read, so a crafted header costs at most this much parsing.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# What torch's weights-only unpickler says about a refused object, without its advice to unpickle unrestricted.
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error: (.*?)(?:\. Please|\.?$)|^\s*(Trying to load unsupported GLOBAL .*?)\.?$",
                               re.MULTILINE)


class CheckpointError(ValueError):
    """A model file that cannot be used, with the file (and key, where one is to blame) in the message."""

    def __init__(self, path: str | os.PathLike[str], message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        # repr() keeps a crafted key's newlines and escapes on one line; the cut keeps a 16 MB key from the message.
        shown = key if key is None or len(key) <= 200 else key[:200] + "..."
        where = f"{self.path}" + (f" [key {shown!r}]" if key else "")
        super().__init__(f"{where}: {message}")


class StateDict(Mapping[str, torch.Tensor]):
    """Read-only tensor mapping over an opened file; safetensors tensors are loaded lazily from the mmap."""

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor] | None, handle=None, metadata=None):
        self.path = path
        self._tensors = tensors
        self._handle = handle
        self._keys = list(handle.keys()) if handle is not None else list(tensors or {})
        self._key_set = set(self._keys)
        self.metadata: dict[str, str] = dict(metadata or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        if self._handle is not None:
            try:
                return self._handle.get_tensor(key)
            except (SafetensorError, RuntimeError, OSError) as exc:
                raise CheckpointError(self.path, f"tensor cannot be read ({exc}); the file may be truncated", key) from exc
        return self._tensors[key]  # type: ignore[index]

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._key_set:
            raise KeyError(key)
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self[key].shape)


class ShapeView(Mapping[str, torch.Tensor]):
    """A prefix-stripped view that hands out meta tensors of the right shape: config inference without I/O."""

    def __init__(self, sd: StateDict, prefix: str):
        self._sd = sd
        self._prefix = prefix
        self._keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return torch.empty(self._sd.shape(self._prefix + key), device="meta")

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_safetensors_header(path: Path) -> None:
    """Fail with a plain-words error before handing a non-safetensors, truncated or crafted file to the parser."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        first = f.read(1)
        if 0 < n <= MAX_HEADER_BYTES and n > size - 8 and first == b"{":
            # A plausible header length and the start of a JSON header, but the file ends inside it.
            raise CheckpointError(
                path, f"file is truncated: the header alone needs {8 + n} bytes but the file has {size}; download it again"
            )
        if n > MAX_HEADER_BYTES and first == b"{":
            raise CheckpointError(path, f"safetensors header of {n} bytes is over the {MAX_HEADER_BYTES} byte limit "
                                        "(a real model's header is under 1 MB); refused unread")
        if n == 0 or n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(path, "not a safetensors file (no valid header); is it a .ckpt renamed, or a download error page?")
        f.seek(8)
        raw = f.read(n)
    if raw.lstrip()[:1] != b"{":
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"corrupt safetensors header ({exc})") from exc
    except RecursionError:
        # Python's json parser recurses per nesting level; a real header is three levels deep.
        raise CheckpointError(path, "corrupt safetensors header (JSON nested too deep; a real header is 3 levels)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError, OverflowError) as exc:
            raise CheckpointError(path, "corrupt safetensors header entry", key) from exc
    if 8 + n + end > size:
        raise CheckpointError(
            path, f"file is truncated: the header describes {8 + n + end} bytes but the file has {size}; download it again"
        )


def weights_only_refusal(exc: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, in one line (torch's own text ends with advice to re-run
    the load unrestricted, which is exactly what must not be done with a file one does not trust)."""
    text = str(exc)
    m = _UNPICKLER_REASON.search(text)
    if "Unsupported operand" in text:  # the bytes are not a pickle at all (torch words it as a refusal)
        return "not a PyTorch file (its bytes are no pickle)"
    reason = next((g.strip() for g in (m.groups() if m else ()) if g and g.strip()), None)
    if reason:
        return f"it holds more than weights ({reason})"
    if "Weights only load failed" in text:
        return "it holds more than weights (Python objects that weights-only unpickling refuses)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {first}" if first else f"{type(exc).__name__}: the file ends early or is not a PyTorch file"


def load_weights_only(path: Path) -> object:
    """A pickled file through torch's weights-only unpickler (tensors and plain containers; a pickle's code is
    refused), memory-mapped where the format allows. Raises whatever torch raises for a bad or hostile file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # Pre-zipfile (legacy) torch.save format: cannot be memory-mapped, read it into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def open_state_dict(path: str | os.PathLike[str], allow_pickle: bool = False) -> StateDict:
    """Open a model file without reading its tensors (safetensors) or with weights-only unpickling (.ckpt)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "file not found")
    if p.is_dir():
        raise CheckpointError(p, "is a directory; give the single-file checkpoint (.safetensors)")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(p, f"{suffix} files are Python pickles and loading a pickle can run code, so they are "
                                     "refused by default; --allow-pickle reads .ckpt/.pt/.pth/.bin with weights-only unpickling "
                                     "(tensors and plain containers; a pickle's code is still refused), or convert the file "
                                     "to .safetensors")
        try:
            obj = load_weights_only(p)
        except Exception as exc:  # torch raises many types for bad pickles
            raise CheckpointError(p, f"cannot be read as a weights-only checkpoint: {weights_only_refusal(exc)}; "
                                     "--allow-pickle never runs a pickle's code: convert it to .safetensors") from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(p, "does not hold a state dict of tensors")
        return StateDict(p, obj)
    _check_safetensors_header(p)
    try:
        handle = safe_open(str(p), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(p, f"cannot be opened as safetensors ({exc})") from exc
    return StateDict(p, None, handle=handle, metadata=handle.metadata())


# ---- hashes -------------------------------------------------------------------------------------------------

def _cache_file() -> Path:
    root = Path(os.environ.get("ADFORGE_CACHE_DIR") or Path.home() / ".cache" / "adforge")
    return root / "hashes.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file, cached by (absolute path, size, mtime) so a 4 GB model is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(block)
    value = digest.hexdigest()
    cache[key] = value
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time
    return value


def a1111_short_hash(sha256: str) -> str:
    """A1111's "Model hash": the first 10 hex characters of the file's sha256."""
    return sha256[:10]

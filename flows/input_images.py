"""Images a brief hands to the engine (product packshots, their masks, ControlNet layouts): found, read and checked
before anything is rendered, and pinned by sha256.

A brief names an image by a path relative to the brief's folder (:class:`FolderSource`), or, for a brief that came
from an S3 inbox, a key under the brief's prefix (:class:`StoreSource`). A path may not lead out of that folder or
prefix: a brief from a browser or an inbox must not be able to read other files of the machine into an asset.

Each image is read under a byte cap and decoded under a pixel cap before its sides are looked at; a missing,
unreadable, too large or too small image is an :class:`InputError` whose message the planner reports against the
brief's file, line and column. The bytes go into the asset store under ``inputs/<sha256><suffix>`` before the run is
recorded (:func:`store_inputs`), so a render worker on any machine reads exactly the file the variant was planned
with.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image, UnidentifiedImageError

from flows.safe_text import quoted

__all__ = ["FolderSource", "InputError", "InputImage", "InputSource", "StoreSource", "input_key", "read_input",
           "store_inputs"]

MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_INPUT_PIXELS = 40_000_000
MIN_INPUT_SIDE = 64
SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


class InputError(ValueError):
    """An input image that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class InputImage:
    """An image as the brief names it (``name``), its bytes and their sha256, and its size."""

    name: str
    data: bytes
    sha256: str
    suffix: str
    size: tuple[int, int]

    @property
    def key(self) -> str:
        return input_key(self.sha256, self.suffix)

    def open(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


def input_key(sha256: str, suffix: str) -> str:
    """Where an input image's bytes are kept in the asset store."""
    return f"inputs/{sha256}{suffix}"


class InputSource(Protocol):
    def read(self, name: str, max_bytes: int) -> bytes:
        """The bytes of ``name``; InputError if it is not there, leads outside the source, or is over ``max_bytes``."""
        ...


class FolderSource:
    """Images beside the brief: ``name`` relative to ``root``, never outside it (``..`` and symlinks followed)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    def read(self, name: str, max_bytes: int) -> bytes:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise InputError(f"{quoted(name)} is outside the brief's folder {self.root}")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise InputError(f"{quoted(name)} is {size // (1024 * 1024)} MiB, more than the {max_bytes // (1024 * 1024)} MiB an input image may be")
                return f.read(max_bytes + 1)
        except IsADirectoryError:
            raise InputError(f"{quoted(name)} is a folder, not an image") from None
        except FileNotFoundError:
            raise InputError(f"{quoted(name)} not found (looked in {self.root})") from None
        except OSError as exc:
            raise InputError(f"{quoted(name)} cannot be read: {exc.strerror or exc}") from None


class StoreSource:
    """Images under the prefix of a brief that came from a store (an S3 inbox): ``name`` relative to ``prefix``."""

    def __init__(self, store, prefix: str):
        self.store = store
        self.prefix = prefix.strip("/")

    def read(self, name: str, max_bytes: int) -> bytes:
        joined = posixpath.normpath(posixpath.join(self.prefix, name.replace("\\", "/")))
        if name.startswith("/") or joined.startswith("..") or (self.prefix and not (joined + "/").startswith(self.prefix + "/")):
            raise InputError(f"{quoted(name)} is outside the brief's prefix {self.prefix or '(the store root)'}")
        try:
            data = self.store.get(joined, max_bytes=max_bytes)  # never more than the cap in memory
        except KeyError:
            raise InputError(f"{quoted(name)} not found (looked for {joined} in {self.store.url})") from None
        except Exception as exc:  # the store's own errors (S3 client errors) name the object; keep it one line
            raise InputError(f"{quoted(name)} cannot be read from {self.store.url}: {type(exc).__name__}: {exc}") from None
        if len(data) > max_bytes:
            raise InputError(f"{quoted(name)} is {len(data) // (1024 * 1024)} MiB, more than the {max_bytes // (1024 * 1024)} MiB an input image may be")
        return data


def read_input(source: InputSource, name: str, *, max_bytes: int = MAX_INPUT_BYTES, min_side: int = MIN_INPUT_SIDE) -> InputImage:
    """Read and check the image ``name`` from ``source``: a PNG, JPEG or WebP file that decodes, at most
    :data:`MAX_INPUT_PIXELS` pixels and at least ``min_side`` pixels a side."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{quoted(name)}: unsupported image type (expected {', '.join(SUFFIXES)})")
    data = source.read(name, max_bytes)
    if len(data) > max_bytes:
        raise InputError(f"{quoted(name)} is more than the {max_bytes // (1024 * 1024)} MiB an input image may be")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > MAX_INPUT_PIXELS:
                raise InputError(f"{quoted(name)} is {w}x{h}, more than the {MAX_INPUT_PIXELS // 1_000_000} megapixels an input image may have")
            probe.load()  # decode it now: a truncated or corrupt file is refused here, not half-way through a run
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{quoted(name)} is not a readable image: {exc}") from None
    if min(w, h) < min_side:
        raise InputError(f"{quoted(name)} is {w}x{h}; an input image needs at least {min_side} pixels a side")
    return InputImage(name, data, hashlib.sha256(data).hexdigest(), suffix, (w, h))


def store_inputs(store, images: list[InputImage]) -> None:
    """Put each image's bytes in ``store`` under its key (once: the key is its content's hash)."""
    for image in {i.key: i for i in images}.values():
        if not store.exists(image.key):
            store.put(image.key, image.data, SUFFIXES[image.suffix])

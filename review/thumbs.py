"""Thumbnails: resized once per asset and width, kept on disk, served from there.

An asset's bytes never change (one file per variant, keys carry the identity hash), so a thumbnail is named by the
asset's sha256 and width and never needs invalidating. Widths are a fixed set: a free width parameter would let any
client fill the cache folder.

A flagged asset that no admin has released gets a blurred thumbnail, blurred in the pixels (a CSS blur is undone by
anyone who opens the image on its own): shrunk to a few pixels, enlarged and blurred again, so no detail survives.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from PIL import Image, ImageFilter

from storage.assets import AssetStore
from storage.image_metadata import write_atomic

__all__ = ["BLUR_CELLS", "THUMB_WIDTHS", "ThumbnailCache", "blur_strongly", "default_cache_dir"]

THUMB_WIDTHS = (160, 320, 640)
BLUR_CELLS = 6  # the blurred picture keeps at most this many cells along its longer side


def default_cache_dir() -> Path:
    # Next to the model hash cache (ADFORGE_CACHE_DIR moves both).
    return Path(os.environ.get("ADFORGE_CACHE_DIR") or "~/.cache/adforge").expanduser() / "thumbs"


class ThumbnailCache:
    def __init__(self, root: str | os.PathLike[str], *, quality: int = 80) -> None:
        self.root = Path(root)
        self.quality = quality
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def path_for(self, sha256: str, width: int, blurred: bool = False) -> Path:
        return self.root / sha256[:2] / f"{sha256}-{width}{'-blurred' if blurred else ''}.webp"

    def get(self, store: AssetStore, key: str, sha256: str, width: int, *, blurred: bool = False) -> Path:
        """The thumbnail file (WebP, at most ``width`` x ``width``, aspect kept); made from the store on a miss."""
        if width not in THUMB_WIDTHS:
            raise ValueError(f"thumbnail width must be one of {THUMB_WIDTHS}, got {width}")
        path = self.path_for(sha256, width, blurred)
        if path.is_file():
            with self._lock:
                self.hits += 1
            return path
        data = store.get(key)
        write_atomic(path, self._resize(data, width, blurred))  # concurrent misses each write whole files; the last rename wins
        with self._lock:
            self.misses += 1
        return path

    def _resize(self, data: bytes, width: int, blurred: bool = False) -> bytes:
        with Image.open(io.BytesIO(data)) as im:
            # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: a 1080 px photo becomes a thumbnail several times faster.
            im.draft("RGB", (width, width))
            im.load()
            keep_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if keep_alpha else "RGB")
            im.thumbnail((width, width), Image.Resampling.LANCZOS, reducing_gap=2.0)
            if blurred:
                im = blur_strongly(im)
            out = io.BytesIO()
            im.save(out, "WEBP", quality=self.quality, method=4)
            return out.getvalue()


def blur_strongly(im: Image.Image) -> Image.Image:
    """``im`` at its size with no detail left: averaged down to BLUR_CELLS cells on the longer side, enlarged
    smoothly, then Gaussian-blurred over about a cell."""
    w, h = im.size
    scale = BLUR_CELLS / max(w, h)
    small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(max(w, h) / BLUR_CELLS / 2))

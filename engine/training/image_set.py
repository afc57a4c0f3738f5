"""A training folder of product photos: images, their captions, and every problem found before training starts.

Layout as kohya's sd-scripts reads it: ``NAME.png|jpg|jpeg|webp`` with an optional caption file ``NAME.txt`` beside
it. An image without a caption file gets ``f"{trigger} {class_word}"`` (kohya's DreamBooth caption, e.g.
"acmebottle bottle"): the LoRA learns the trigger word as the product and the class word keeps the prior of what
kind of thing it is; prompts then say "a photo of acmebottle bottle on a beach" as usual. No "a photo of" is
added: it would teach that phrase along with the product, and kohya-trained LoRAs don't carry it either.

All problems are collected first and raised together (:class:`ImageSetError`), one line per file, so a user fixes
the folder once instead of once per training attempt. Image files are bounded by bytes and pixels before they are
decoded (a decompression bomb is refused by its header, not after it filled the memory).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
# A phone photo is 5-30 MB and 12-50 megapixels; anything far beyond is no training photo (or is a bomb).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000
MAX_CAPTION_BYTES = 64 * 1024


class ImageSetError(ValueError):
    """Every problem of a training folder, one line each (``problems``), naming the file."""

    def __init__(self, folder: str | os.PathLike[str], problems: list[str]):
        self.folder = str(folder)
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"training images in {self.folder}: {count}\n" + "\n".join(f"  {p}" for p in problems))


class ImageItem(NamedTuple):
    path: Path
    caption: str
    width: int  # after EXIF orientation
    height: int


@dataclass(frozen=True)
class ImageSet:
    folder: Path
    trigger: str
    class_word: str
    items: list[ImageItem]
    # sha256 over the sorted relative names, each image's bytes and each caption: the identity of what was trained on.
    sha256: str
    # How many of ``items`` (the last ones) are regularisation images (kohya's reg_data_dir): pictures of the class
    # without the product, captioned without the trigger, so the class word keeps its meaning.
    regularisation: int = 0
    regularisation_folder: Path | None = None

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: {dataset folder name: {tag: count}}, tags = comma-separated caption parts."""
        counts: Counter[str] = Counter()
        for item in self.items:
            counts.update(t.strip() for t in item.caption.split(",") if t.strip())
        return {self.folder.name: dict(counts)}


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """An RGB image with its EXIF orientation applied (a phone photo shot upright trains upright)."""
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im).convert("RGB")


def mentions(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` appears as a whole word (any case): "acme" is not mentioned by "acmeville"."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def _check_image(path: Path, min_side: int) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height) after orientation, None) or (None, problem)."""
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return None, f"{path.name}: file is {size / 2**20:.0f} MB, over the {MAX_IMAGE_BYTES // 2**20} MB limit for a training image"
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: checked before decoding a single pixel
            if w * h > MAX_IMAGE_PIXELS:
                return None, (f"{path.name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixel limit for a training image")
            im.load()  # a truncated or corrupt file fails here, not in the middle of training
            im = ImageOps.exif_transpose(im)
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"{path.name}: not a readable image ({type(exc).__name__}: {exc})"
    if min(w, h) < min_side:
        return None, f"{path.name}: {w}x{h} is too small; the shorter side must be at least {min_side} px (the training resolution)"
    return (w, h), None


def _read_caption(path: Path, trigger: str, *, must_mention: bool = True) -> tuple[str | None, str | None]:
    if path.stat().st_size > MAX_CAPTION_BYTES:
        return None, f"{path.name}: caption file is over {MAX_CAPTION_BYTES // 1024} KB"
    try:
        text = path.read_bytes().decode("utf-8-sig")  # editors on Windows write a BOM
    except UnicodeDecodeError as exc:
        return None, f"{path.name}: caption is not UTF-8 text (byte {exc.start})"
    caption = " ".join(text.split())  # newlines in a caption file are line wrapping, not meaning
    if must_mention and not mentions(caption, trigger):
        return None, f"{path.name}: caption does not mention the trigger word {trigger!r}: {caption[:80]!r}"
    if not must_mention and mentions(caption, trigger):
        return None, (f"{path.name}: a regularisation caption must not say the trigger word {trigger!r} (the picture "
                      f"has no product in it): {caption[:80]!r}")
    if not caption:
        return None, f"{path.name}: caption file is empty"
    return caption, None


def load_image_set(folder: str | os.PathLike[str], *, trigger: str, class_word: str, min_side: int) -> ImageSet:
    """Read and check a training folder (not recursive); raises :class:`ImageSetError` listing every problem."""
    return _load(folder, trigger, class_word, min_side, regularisation=False)


def load_regularisation_set(folder: str | os.PathLike[str], *, trigger: str, class_word: str,
                            min_side: int) -> ImageSet:
    """Read and check a folder of regularisation images (kohya's ``--reg_data_dir``): the caption is the sidecar
    ``.txt``, else the class word alone, and a caption that says the trigger is refused (it would teach the product
    on a picture without it). Raises :class:`ImageSetError` listing every problem."""
    return _load(folder, trigger, class_word, min_side, regularisation=True)


def with_regularisation(image_set: ImageSet, reg: ImageSet) -> ImageSet:
    """``image_set`` with ``reg``'s images appended (each step draws from both, as kohya mixes reg images in); the
    identity covers both sets."""
    digest = hashlib.sha256(f"{image_set.sha256}+reg:{reg.sha256}".encode()).hexdigest()
    return ImageSet(image_set.folder, image_set.trigger, image_set.class_word, [*image_set.items, *reg.items], digest,
                    regularisation=len(reg.items), regularisation_folder=reg.folder)


def _load(folder: str | os.PathLike[str], trigger: str, class_word: str, min_side: int, *,
          regularisation: bool) -> ImageSet:
    root = Path(folder)
    if not trigger.strip() or not class_word.strip():
        raise ValueError("the trigger word and the class word must not be empty")
    what = "regularisation images" if regularisation else "images"
    if not root.is_dir():
        raise ImageSetError(root, [f"{root}: not a folder"])
    images = sorted(p for p in root.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise ImageSetError(root, [f"{root}: no {what} ({', '.join(IMAGE_SUFFIXES)}) in the folder"])
    problems: list[str] = []
    items: list[ImageItem] = []
    digest = hashlib.sha256()
    for path in images:
        size, problem = _check_image(path, min_side)
        if problem:
            problems.append(problem)
        side = path.with_suffix(CAPTION_SUFFIX)
        caption: str | None = class_word if regularisation else f"{trigger} {class_word}"
        if side.is_file():
            caption, problem = _read_caption(side, trigger, must_mention=not regularisation)
            if problem:
                problems.append(problem)
        if size is None or caption is None:
            continue
        items.append(ImageItem(path, caption, *size))
        for part in (path.name.encode(), path.read_bytes(), caption.encode()):
            # Length-prefixed, so no two different sets can hash the same by shifting bytes between fields.
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    if problems:
        raise ImageSetError(root, problems)
    return ImageSet(root, trigger, class_word, items, digest.hexdigest())

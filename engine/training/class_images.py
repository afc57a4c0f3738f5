"""Class images for DreamBooth's prior preservation, rendered by the model that is about to be fine-tuned.

Prior preservation (Ruiz et al. 2022) trains on "a photo of a bottle" images *the base model itself* made, beside
the product photos: whatever the fine-tune does to the class word is pulled back toward what the base did, so
"bottle" still means any bottle and not only ours. Rendering a hundred images takes a while, so the folder is a
cache with a manifest (``class-images.json``): the prompt, the render settings, the base model's sha256, and each
image's file, seed and sha256. Image ``i`` always has seed ``seed + i``, so asking for more images later only
renders the new ones, and a re-run after a kill renders exactly the images that are missing or damaged (each PNG
and the manifest are written atomically, the manifest after every batch).

A folder whose manifest names another prompt, model or render setting is **refused**, not re-rendered: the
images in it may be the user's only copy of a long render, and silently replacing them (or mixing two priors in one
training) is worse than asking for a new folder. The error says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.requests import GenerationRequest
from engine.training.image_set import ImageItem, ImageSet

MANIFEST = "class-images.json"
MANIFEST_VERSION = 1
# Images per pipeline call: the manifest is updated after each call, so a kill loses at most this many renders.
RENDER_BATCH = 4


class ClassImagesMismatch(ValueError):
    """The class-image folder was rendered with another prompt, model or settings."""


@dataclass(frozen=True)
class ClassImages:
    folder: Path
    prompt: str
    paths: list[Path]  # image i at index i
    seeds: list[int]
    rendered: int  # made by this call
    reused: int  # already in the folder and intact

    def image_set(self, *, size: int, trigger: str = "", class_word: str = "") -> ImageSet:
        """The images as an :class:`ImageSet` captioned with the class prompt (what the trainer feeds on).
        Its sha256 covers names, bytes and captions, like a product folder's."""
        digest = hashlib.sha256()
        items = []
        for path in self.paths:
            items.append(ImageItem(path, self.prompt, size, size))
            for part in (path.name.encode(), path.read_bytes(), self.prompt.encode()):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
        return ImageSet(self.folder, trigger, class_word, items, digest.hexdigest())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def render_class_images(
    pipeline,
    prompt: str,
    n: int,
    out_dir: str | os.PathLike[str],
    *,
    size: int,
    steps: int,
    seed: int,
    negative_prompt: str = "",
    cfg_scale: float = 7.0,
    sampler: str = "DPM++ 2M Karras",
) -> ClassImages:
    """Make sure ``out_dir`` holds ``n`` class images of ``prompt`` from ``pipeline``'s model (an
    :class:`engine.pipeline.Pipeline`), rendering only those not already there; raises :class:`ClassImagesMismatch`
    if the folder belongs to another prompt, model or render setting.

    Call it before the model is changed: the manifest records the model's file sha256, which cannot tell a
    fine-tuned model in memory from the file it was loaded from."""
    if n < 0:
        raise ValueError("the number of class images must not be negative")
    if not prompt.strip():
        raise ValueError("the class prompt must not be empty")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"version": MANIFEST_VERSION, "prompt": prompt, "negative_prompt": negative_prompt,
                "model_sha256": pipeline.models.checkpoint.sha256, "size": size, "steps": steps,
                "cfg_scale": cfg_scale, "sampler": sampler, "seed": seed}
    manifest_path = folder / MANIFEST
    images: dict[int, dict] = {}
    if manifest_path.exists():
        stored = json.loads(manifest_path.read_text())
        differs = [k for k, v in identity.items() if stored.get(k) != v]
        if differs:
            details = ", ".join(f"{k}: {stored.get(k)!r} there, {identity[k]!r} now" for k in differs)
            raise ClassImagesMismatch(f"{folder} holds class images rendered differently ({details}); use another "
                                      "folder, or delete this one to render them again")
        images = {int(e["index"]): e for e in stored.get("images", [])}

    def intact(i: int) -> bool:
        entry = images.get(i)
        path = folder / entry["file"] if entry else None
        return path is not None and path.is_file() and _sha256(path) == entry["sha256"]

    missing = [i for i in range(n) if not intact(i)]
    reused = n - len(missing)
    for start in range(0, len(missing), RENDER_BATCH):
        batch = missing[start:start + RENDER_BATCH]
        requests = [GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed + i, width=size,
                                      height=size, steps=steps, cfg_scale=cfg_scale, sampler=sampler) for i in batch]
        for i, result in zip(batch, pipeline.generate(requests)):
            path = folder / f"class-{i:05d}.png"
            tmp = path.with_suffix(".part")
            result.image.save(tmp, format="PNG")
            os.replace(tmp, path)
            images[i] = {"index": i, "file": path.name, "seed": seed + i, "sha256": _sha256(path)}
        _write_json_atomically(manifest_path, {**identity, "images": [images[k] for k in sorted(images)]})
    if not manifest_path.exists():  # n == 0 on a new folder: still claim it for this prompt and model
        _write_json_atomically(manifest_path, {**identity, "images": []})
    return ClassImages(folder=folder, prompt=prompt, paths=[folder / images[i]["file"] for i in range(n)],
                       seeds=[seed + i for i in range(n)], rendered=len(missing), reused=reused)

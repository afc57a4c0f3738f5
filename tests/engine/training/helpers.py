"""Helpers shared by the brand trainers' tests (LoRA, embedding, DreamBooth): the product photos they train on and
the stand-in for a kill in the middle of a run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from engine.training.image_set import ImageSet, load_image_set


class Killed(Exception):
    """Raised from ``on_step`` to stop a run as a kill would (the trainers leave their last saved state)."""


def kill_at(step: int, seen: list[int]) -> Callable[[int, int, float], None]:
    """An ``on_step`` that records each step in ``seen`` and raises :class:`Killed` at ``step``."""
    def on_step(done: int, total: int, loss: float) -> None:
        seen.append(done)
        if done == step:
            raise Killed
    return on_step


def product_images(folder: Path, sizes: Sequence[tuple[int, int]], caption: str | None = None, *,
                   min_side: int) -> ImageSet:
    """Blocky random photos of the given (width, height) sizes in ``folder`` ("zwx", a bottle), the first one
    with ``caption`` in a side-car file."""
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(sizes):
        pixels = (torch.rand(h // 8, w // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).resize((w, h), Image.Resampling.NEAREST).save(folder / f"shot{i}.png")
    if caption is not None:
        (folder / "shot0.txt").write_text(caption)
    return load_image_set(folder, trigger="zwx", class_word="bottle", min_side=min_side)

"""A brand colour the bundled demo model has never drawn, drawn procedurally, and the evaluator that finds it: the
concept of the embedding half of the brand-training proof (issue 22).

**Why a colour, not the banded "acme mug"** (:mod:`demo.brand_concept`): textual inversion changes no weight, so it
can only steer the model towards pictures its frozen U-Net can already make; it never drew bands and no vector makes
it (demo/NOTES.md: 0.00-0.05 over every setting tried). What a frozen model can reach but was never taught is
a *new value* of something it does draw: here an object colour off its palette. The demo world
(:data:`demo.scenes.COLORS`) has ten flat colours; **"acme brown"** (:data:`BRAND_RGB`) is none of them -- its
nearest palette colour is black, CIE76 distance 42, then orange and red at 56 -- so a render whose object is brown
was made by the embedding, not by a word the model knows. That is also what brand teams ask an embedding for: the
brand's own colour on whatever the prompt describes.

**Photos**: :func:`write_colour_images` draws demo-style scenes (a flat shape, a size word, a position, a solid
background) with the object in the brand colour, in square and non-square sizes, captioned in the demo grammar with
the trigger in the colour's place ("a large acme hexagon on the left, on a blue background").

**Evaluator**: :func:`colour_delta_e` finds the object with :func:`demo.evaluate.score_image` (the demo
evaluator's background model and component search; its colour is the median of the object's interior) and returns
the CIE76 distance of that colour from :data:`BRAND_RGB`. :func:`colour_present` says whether it is within
:data:`PRESENT_DELTA_E`, half the distance to the nearest palette colour, so a present verdict is always nearer the
brand colour than to any colour the model knew. Drawn photos score 0 (they are the colour), and every palette
colour is at least 42 away, so a render counts only if the model drew a colour it was never shown.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from demo.lab_colors import rgb_to_lab
from demo.scenes import COLORS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES, Scene, SceneObject, shape_mask

TRIGGER = "acme"
BRAND_RGB: tuple[int, int, int] = (120, 72, 40)
# The embedding's vectors start from the palette colour nearest in hue (an embedding starts from its init text).
INIT_WORD = "orange"
# Backgrounds the brand colour stands out from (black is its nearest palette colour; orange and red share its hue).
BACKGROUNDS = tuple(c for c in COLORS if c not in ("black", "orange", "red"))
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (160, 128), (128, 192), (256, 256), (192, 128), (128, 160))


def _lab(rgb: Sequence[float]) -> np.ndarray:
    return rgb_to_lab(np.asarray(rgb, dtype=np.float32).reshape(3))


def palette_distance() -> float:
    """CIE76 distance from the brand colour to the nearest palette colour."""
    brand = _lab(BRAND_RGB)
    return float(min(np.linalg.norm(_lab(v) - brand) for v in COLORS.values()))


PRESENT_DELTA_E = palette_distance() / 2  # ~21


@dataclass(frozen=True)
class ColourScene:
    """One scene of the concept: the demo :class:`Scene` the evaluator scores against (its object's palette colour
    is a placeholder the verdicts used here ignore) and the prompt with and without the trigger."""

    scene: Scene
    prompt: str  # "a large acme hexagon on the left, on a blue background"
    without_trigger: str  # "a large hexagon on the left, on a blue background"


def colour_scene(rng: random.Random, trigger: str = TRIGGER) -> ColourScene:
    obj = SceneObject(rng.choice(SHAPES), "orange", "large" if rng.random() < 0.7 else "small", rng.choice(list(POSITIONS)))
    scene = Scene(rng.choice(BACKGROUNDS), (obj,))
    where = rng.choice(POSITION_PHRASES[obj.position])
    backdrop = rng.choice((f"on {_a(scene.background)} background", f"{scene.background} background"))
    size = f"{obj.size} " if obj.size == "small" or rng.random() < 0.8 else ""
    return ColourScene(scene, f"{_a(size + trigger)} {obj.shape} {where}, {backdrop}",
                       f"{_a(size + obj.shape)} {where}, {backdrop}")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def draw(scene: Scene, size: tuple[int, int]) -> Image.Image:
    """``scene`` at ``size`` (width, height) with its object in the brand colour; positions are fractions of each
    side and the object's diameter a fraction of the shorter one, as in the demo world."""
    width, height = size
    obj = scene.objects[0]
    fx, fy = POSITIONS[obj.position]
    r = SIZES[obj.size] * min(width, height) / 2
    canvas = max(width, height)
    mask = shape_mask(obj.shape, canvas, fx * width, fy * height, r).crop((0, 0, width, height))
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    bg = np.array(COLORS[scene.background], dtype=np.float32)
    pixels = bg * (1 - m) + np.array(BRAND_RGB, dtype=np.float32) * m
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_colour_images(folder: str | Path, n: int = 16, seed: int = 0, *, trigger: str = TRIGGER,
                        sizes: Sequence[tuple[int, int]] = IMAGE_SIZES) -> list[Path]:
    """``n`` photos with sidecar captions in ``folder``, cycling through ``sizes``; returns the image paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        concept = colour_scene(rng, trigger)
        path = out / f"{trigger}_colour_{i:02d}.png"
        draw(concept.scene, sizes[i % len(sizes)]).save(path)
        path.with_suffix(".txt").write_text(concept.prompt + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def colour_delta_e(image: Image.Image | np.ndarray, scene: Scene) -> float | None:
    """CIE76 distance of the detected object's colour from the brand colour; None when no object is found."""
    from demo.evaluate import score_image

    found = score_image(image, scene).detected.get("object")
    if not found:
        return None
    return float(np.linalg.norm(_lab(found["rgb"]) - _lab(BRAND_RGB)))


def colour_present(image: Image.Image | np.ndarray, scene: Scene) -> bool:
    d = colour_delta_e(image, scene)
    return d is not None and d < PRESENT_DELTA_E


def eval_scenes(n: int, seed: int, trigger: str = TRIGGER) -> list[ColourScene]:
    rng = random.Random(seed)
    return [colour_scene(rng, trigger) for _ in range(n)]

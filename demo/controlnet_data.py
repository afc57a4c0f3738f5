"""The bundled model's ControlNet data: procedural scenes paired with layout sketches, captions without positions.

A *layout sketch* is what a designer scribbles to say where things go: each object's outline (the edge of its
:func:`demo.scenes.shape_mask`, white lines about 2 px wide on black, RGB) at its place and size, nothing else. The
caption names the objects' colour, shape and size and the background, but never where an object is
(:func:`layout_caption`): the position is in the sketch only, so a ControlNet trained on these pairs must take it
from there, and the evaluator can tell whether it did (``bench/controlnet_layout.py``).

Everything is drawn from a seed; scenes never use the held-out (colour, shape) pairs, as the demo model's own
training never did.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image

from demo.masks import dilate, erode
from demo.scenes import NATIVE_SIZE, PRODUCT_WORDS, Scene, SceneObject, object_geometry, random_scene, render, shape_mask
from engine.training.controlnet_trainer import ControlSample

__all__ = ["layout_caption", "layout_samples", "layout_scene", "layout_sketch"]


def layout_sketch(objects: Sequence[SceneObject], size: int = NATIVE_SIZE) -> Image.Image:
    """White outlines of ``objects`` on black, RGB: one pixel inside each shape's edge and one outside (~2 px)."""
    lines = np.zeros((size, size), dtype=bool)
    for obj in objects:
        cx, cy, r = object_geometry(obj, size)
        inside = np.asarray(shape_mask(obj.shape, size, cx, cy, r)) >= 128
        lines |= dilate(inside) & ~erode(inside)
    gray = np.where(lines, 255, 0).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def layout_caption(scene: Scene, rng: random.Random) -> str:
    """A caption of ``scene`` in the demo grammar (:func:`demo.scenes.caption`) with no position phrase: colour,
    shape and size of each object, and the background (a gradient with its direction)."""
    def thing(obj: SceneObject) -> str:
        size = f"{obj.size} " if obj.size == "small" or rng.random() < 0.7 else ""
        return f"{_a(size + obj.color)} {obj.shape}"

    things = " and ".join(thing(o) for o in scene.objects)
    if scene.background2 is None:
        bg = rng.choice((f"on {_a(scene.background)} background", f"{scene.background} background",
                         f"against a plain {scene.background} backdrop"))
    else:
        pair = f"{scene.background} to {scene.background2} {scene.gradient} gradient background"
        bg = rng.choice((f"on {_a(pair)}", pair))
    return f"{rng.choice(PRODUCT_WORDS)}{things}, {bg}"


def layout_scene(rng: random.Random, *, n_objects: int | None = None) -> Scene:
    """A random scene (one object, a quarter of the time two) captioned by :func:`layout_caption`."""
    plain = random_scene(rng, held_out=False, n_objects=n_objects)
    return Scene(plain.background, plain.objects, plain.background2, plain.gradient,
                 caption=layout_caption(plain, rng))


def layout_samples(seed: int, n: int, size: int = NATIVE_SIZE) -> list[ControlSample]:
    """``n`` (render, layout sketch, position-free caption) triples, reproducible from ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = layout_scene(rng)
        out.append(ControlSample(render(scene, size), layout_sketch(scene.objects, size), scene.caption))
    return out

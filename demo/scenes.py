"""Procedural captioned scenes: coloured shapes ("products") on solid or two-colour gradient backgrounds.

Everything is drawn from a seed, so the dataset is reproducible and needs no download. A scene is described
by a :class:`Scene` (the ground truth the evaluator scores against) and rendered with Pillow at 4x and
downsampled, so edges are anti-aliased like real images. Some (colour, shape) pairs never appear in training
(:data:`HELD_OUT`) and serve to test whether the model composes words it has only seen apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

NATIVE_SIZE = 128

# Well separated in RGB so the evaluator can name a colour by nearest neighbour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (250, 225, 40),
    "green": (40, 170, 60),
    "teal": (20, 150, 150),
    "blue": (35, 75, 215),
    "purple": (130, 50, 175),
    "pink": (245, 140, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
POSITIONS: dict[str, tuple[float, float]] = {  # object centre as a fraction of the canvas
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
SIZES: dict[str, float] = {"small": 0.24, "large": 0.42}  # object diameter as a fraction of the canvas
GRADIENT_DIRECTIONS = ("vertical", "horizontal")
# Combinations never shown in training: the evaluator reports them separately.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("green", "star"), ("purple", "triangle"), ("orange", "hexagon"), ("blue", "diamond"), ("pink", "square"), ("yellow", "circle")}
)
# Pairs too close to tell apart reliably in small renders; never used as object-on-background.
_LOW_CONTRAST = {frozenset({"white", "yellow"}), frozenset({"white", "pink"}), frozenset({"orange", "yellow"}),
                 frozenset({"green", "teal"}), frozenset({"blue", "purple"}), frozenset({"red", "orange"}),
                 frozenset({"orange", "pink"}), frozenset({"red", "pink"}), frozenset({"black", "purple"}),
                 frozenset({"black", "blue"}), frozenset({"blue", "teal"})}
PRODUCT_WORDS = ("", "product shot of ", "an ad with ", "a minimal banner with ", "a clean poster showing ")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str  # colour name (solid) or the first colour of the gradient
    objects: tuple[SceneObject, ...]
    background2: str | None = None  # second gradient colour; None = solid
    gradient: str = "vertical"  # first colour at the top (vertical) or at the left (horizontal)
    caption: str = field(default="", compare=False)

    @property
    def is_gradient(self) -> bool:
        return self.background2 is not None


def contrasts(a: str, b: str) -> bool:
    return a != b and frozenset({a, b}) not in _LOW_CONTRAST


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.88
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi / 5 * k
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, supersample: int = 4) -> Image.Image:
    """Anti-aliased "L" mask of one shape on a ``size`` x ``size`` canvas."""
    big = Image.new("L", (size * supersample, size * supersample), 0)
    d = ImageDraw.Draw(big)
    s = supersample
    if shape == "circle":
        d.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        d.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r)], fill=255)
    return big.resize((size, size), Image.Resampling.BOX)


def object_geometry(obj: SceneObject, size: int) -> tuple[float, float, float]:
    fx, fy = POSITIONS[obj.position]
    return fx * size, fy * size, SIZES[obj.size] * size / 2


def background_array(scene: Scene, size: int) -> np.ndarray:
    c1 = np.array(COLORS[scene.background], dtype=np.float32)
    if scene.background2 is None:
        return np.broadcast_to(c1, (size, size, 3)).copy()
    c2 = np.array(COLORS[scene.background2], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = ramp[:, None, None] if scene.gradient == "vertical" else ramp[None, :, None]
    return (c1 * (1 - t) + c2 * t) * np.ones((size, size, 1), dtype=np.float32)


def render(scene: Scene, size: int = NATIVE_SIZE) -> Image.Image:
    img = background_array(scene, size)
    for obj in scene.objects:
        cx, cy, r = object_geometry(obj, size)
        m = np.asarray(shape_mask(obj.shape, size, cx, cy, r), dtype=np.float32)[..., None] / 255.0
        img = img * (1 - m) + np.array(COLORS[obj.color], dtype=np.float32) * m
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: SceneObject, rng: random.Random) -> str:
    size = f"{obj.size} " if obj.size == "small" or rng.random() < 0.7 else ""
    return f"{_a(size + obj.color)} {obj.shape} {rng.choice(POSITION_PHRASES[obj.position])}"


def _gradient_phrase(scene: Scene, state_direction: bool) -> str:
    # "vertical": the first colour at the top; "horizontal": at the left. A fixed word, drawing nothing from the
    # caller's rng, so the scenes drawn after a caption are the same with and without it.
    direction = f"{scene.gradient} " if state_direction else ""
    return f"{scene.background} to {scene.background2} {direction}gradient background"


def caption(scene: Scene, rng: random.Random, *, state_direction: bool = True) -> str:
    """A caption stating everything in ``scene``. ``state_direction=False``: gradients without their direction, the
    wording the demo model's stages 1-3 were trained on (an unstated direction can't be followed, and the evaluator
    scores it)."""
    things = " and ".join(_object_phrase(o, rng) for o in scene.objects)
    if scene.background2 is None:
        bg = rng.choice((f"on {_a(scene.background)} background", f"{scene.background} background", f"against a plain {scene.background} backdrop"))
    else:
        pair = _gradient_phrase(scene, state_direction)
        bg = rng.choice((f"on {_a(pair)}", pair))
    return f"{rng.choice(PRODUCT_WORDS)}{things}, {bg}"


# What the text encoder's training-only attribute heads predict from a caption (engine/training/diffusion_trainer.py):
# background colour, second gradient colour (or "solid"), the first object's colour, shape, position and size, and
# the gradient's direction. Which of them a training stage uses is its caption edition (:data:`EDITION_ATTRIBUTES`).
CAPTION_ATTRIBUTES = ("background", "background2", "object_color", "object_shape", "object_position", "object_size",
                      "gradient_direction")
ATTRIBUTE_CLASSES = (len(COLORS), len(COLORS) + 1, len(COLORS), len(SHAPES), len(POSITIONS), len(SIZES),
                     len(GRADIENT_DIRECTIONS))
# Caption editions: 1 = the wording and heads of the demo model's stages 1-3 (gradient direction unstated); 2 = the
# gradient's direction is stated and the heads also learn the object's position and size and that direction.
EDITION_ATTRIBUTES: dict[int, frozenset[str]] = {
    1: frozenset(CAPTION_ATTRIBUTES[:4]),
    2: frozenset(CAPTION_ATTRIBUTES),
}
CAPTION_EDITIONS = tuple(EDITION_ATTRIBUTES)


def attribute_targets(scene: Scene, stated: frozenset[str] | None = None, edition: int = 2) -> list[int]:
    """Class index of each of :data:`CAPTION_ATTRIBUTES` for ``scene``; -100 (ignored) for those the caption does
    not state (``stated=None``: a full caption states all) and for those caption ``edition`` does not train."""
    colors = list(COLORS)
    obj = scene.objects[0]
    values = {
        "background": colors.index(scene.background),
        "background2": len(colors) if scene.background2 is None else colors.index(scene.background2),
        "object_color": colors.index(obj.color),
        "object_shape": SHAPES.index(obj.shape),
        "object_position": list(POSITIONS).index(obj.position),
        # A caption leaves "large" out now and then but always says "small", so a full caption states the size.
        "object_size": list(SIZES).index(obj.size),
        "gradient_direction": -100 if scene.background2 is None else GRADIENT_DIRECTIONS.index(scene.gradient),
    }
    used = EDITION_ATTRIBUTES[edition]
    return [values[a] if a in used and (stated is None or a in stated) else -100 for a in CAPTION_ATTRIBUTES]


def partial_caption(scene: Scene, rng: random.Random, *, state_direction: bool = True) -> tuple[str, frozenset[str]]:
    """A caption that states only part of the scene -- a bare colour word, "a red circle", "blue background" -- and
    which attributes it states. Trained on now and then, so that a few words alone (a negative prompt such as
    "red") mean what they mean inside a full caption. ``state_direction`` as in :func:`caption`."""
    obj = scene.objects[0]
    kind = rng.randrange(5)
    if kind == 0:  # a colour anywhere in the image: says nothing about which part is that colour
        present = [o.color for o in scene.objects] + [scene.background] + ([scene.background2] if scene.background2 else [])
        return rng.choice(present), frozenset()
    if kind == 1:
        return f"{_a(obj.color)} {obj.shape}", frozenset({"object_color", "object_shape"})
    if kind == 2:
        return _a(obj.shape), frozenset({"object_shape"})
    if kind == 3:
        if scene.background2 is None:
            text = rng.choice((f"{scene.background} background", f"on {_a(scene.background)} background"))
            return text, frozenset({"background", "background2"})
        stated = {"background", "background2"} | ({"gradient_direction"} if state_direction else set())
        return _gradient_phrase(scene, state_direction), frozenset(stated)
    # An object phrase always says "small" when it is, so it states the size even when "large" is left out.
    return _object_phrase(obj, rng), frozenset({"object_color", "object_shape", "object_position", "object_size"})


def random_scene(rng: random.Random, *, held_out: bool | None = False, n_objects: int | None = None) -> Scene:
    """A random scene. ``held_out=False`` never uses :data:`HELD_OUT` pairs, ``True`` always makes the first
    object one of them, ``None`` does not care."""
    colors = list(COLORS)
    while True:
        bg = rng.choice(colors)
        bg2 = rng.choice([c for c in colors if c != bg]) if rng.random() < 0.3 else None
        direction = rng.choice(GRADIENT_DIRECTIONS)
        count = n_objects or (1 if rng.random() < 0.75 else 2)
        positions = rng.sample(["left", "right"], 2) if count == 2 else [rng.choice(list(POSITIONS))]
        objects = []
        for i, pos in enumerate(positions):
            if held_out and i == 0:
                color, shape = rng.choice(sorted(HELD_OUT))
            else:
                color, shape = rng.choice(colors), rng.choice(SHAPES)
            size = "small" if count == 2 else rng.choice(list(SIZES))
            objects.append(SceneObject(shape, color, size, pos))
        if held_out is False and any((o.color, o.shape) in HELD_OUT for o in objects):
            continue
        if not all(contrasts(o.color, bg) and (bg2 is None or contrasts(o.color, bg2)) for o in objects):
            continue
        if count == 2 and objects[0].color == objects[1].color and objects[0].shape == objects[1].shape:
            continue
        scene = Scene(bg, tuple(objects), bg2, direction)
        return Scene(bg, tuple(objects), bg2, direction, caption=caption(scene, rng))


def sample_batch(seed: int, n: int, size: int = NATIVE_SIZE, held_out: bool | None = False) -> tuple[np.ndarray, list[Scene]]:
    """(n, 3, size, size) float32 images in [0, 1] and their scenes, reproducible from ``seed``."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, held_out=held_out) for _ in range(n)]
    images = np.stack([np.asarray(render(s, size), dtype=np.float32).transpose(2, 0, 1) / 255.0 for s in scenes])
    return images, scenes

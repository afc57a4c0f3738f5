"""Natural phrasings the demo caption grammar (:func:`demo.scenes.caption`) never produces.

The bundled model was trained on one sentence shape: "[product words] OBJECT POSITION, BACKGROUND". People write
"blue background with a red circle", "a red circle on a blue background" (no position), "red circle on the left
blue background" (no comma, no article), or ask for white objects. This module widens the grammar with templates
of two disjoint kinds:

- :data:`TRAIN_TEMPLATES`: used (mixed with the original grammar) to fine-tune the model;
- :data:`HELD_OUT_TEMPLATES`: never trained on; ``bench/phrasing_adherence.py`` measures adherence on them.

Each template is written in slots: ``{obj}`` ("a small red circle"), ``{bare}`` (the object without its article:
"small red circle"), ``{pos}`` ("on the left"), ``{bg}`` ("blue" or "yellow to pink vertical gradient") and
``{a_bg}`` (``{bg}`` with its article). A template without ``{pos}`` does not state the position: the scene still
has one (a training image must put the object somewhere), and the evaluator must not score it
(:attr:`Phrased.states_position`). Every held-out template holds a connective (:attr:`Template.marker`) that no
training caption, old grammar or new, contains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from demo.scenes import COLORS, POSITION_PHRASES, Scene, _a, caption, contrasts, random_scene


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    marker: str  # a regular expression this template's captions match (held-out: no training caption matches it)

    @property
    def states_position(self) -> bool:
        return "{pos}" in self.text


@dataclass(frozen=True)
class Phrased:
    scene: Scene  # the ground truth (its own ``caption`` is the old grammar's, unused here)
    text: str  # the caption in this template's phrasing
    template: str
    states_position: bool


# A position phrase followed straight by a colour word: no comma, no connective ("on the left blue background").
_POSITION_THEN_COLOUR = (r"(?:%s) (?:%s)\b" % ("|".join(p for ps in POSITION_PHRASES.values() for p in ps), "|".join(COLORS)))
TRAIN_TEMPLATES: tuple[Template, ...] = (
    Template("object-position-on-background", "{obj} {pos} on {a_bg} background", r" on an? "),
    Template("background-with-object-position", "{bg} background with {obj} {pos}", "background with "),
    Template("object-on-background", "{obj} on {a_bg} background", r" on an? "),
    Template("background-with-object", "{bg} background with {obj}", "background with "),
    Template("background-then-object-position", "{a_bg} background showing {obj} {pos}", "background showing "),
    Template("bare-object-on-background", "{bare} on {bg} background", r"^\w+ \w+( \w+)? on "),
)
HELD_OUT_TEMPLATES: tuple[Template, ...] = (
    Template("bare-object-position-background", "{bare} {pos} {bg} background", _POSITION_THEN_COLOUR),
    Template("object-over-background", "{obj} over {a_bg} background", " over "),
    Template("background-and-object-position", "{bg} background and {obj} {pos}", r"background and an? "),
    Template("object-in-front-of-background", "{obj} in front of {a_bg} background", " in front of "),
    Template("background-behind-object", "{bg} backdrop behind {obj}", " behind "),
)
WHITE_SHARE = 0.25  # of the scenes drawn: a white object on a coloured background


def _slots(scene: Scene, rng: random.Random) -> dict[str, str]:
    obj = scene.objects[0]
    size = f"{obj.size} " if obj.size == "small" or rng.random() < 0.5 else ""
    bare = f"{size}{obj.color} {obj.shape}"
    if scene.background2 is None:
        bg = scene.background
    else:
        bg = f"{scene.background} to {scene.background2} {scene.gradient} gradient"
    return {"obj": _a(bare), "bare": bare, "pos": rng.choice(POSITION_PHRASES[obj.position]), "bg": bg, "a_bg": _a(bg)}


def phrase(scene: Scene, template: Template, rng: random.Random) -> Phrased:
    """``scene`` (one object) described in ``template``'s words."""
    if len(scene.objects) != 1:
        raise ValueError("phrasings describe one-object scenes")
    text = template.text.format(**_slots(scene, rng))
    return Phrased(scene, text, template.name, template.states_position)


def one_object_scene(rng: random.Random, *, white: bool) -> Scene:
    """A one-object scene (trained colour/shape pairs only); ``white``: a white object on a background it stands out
    from."""
    while True:
        scene = random_scene(rng, held_out=False, n_objects=1)
        if not white:
            return scene
        obj = scene.objects[0]
        whitened = type(obj)(obj.shape, "white", obj.size, obj.position)
        backgrounds = [scene.background] + ([scene.background2] if scene.background2 else [])
        if all(contrasts("white", b) for b in backgrounds):
            return Scene(scene.background, (whitened,), scene.background2, scene.gradient)


def phrased_set(seed: int, n: int, templates: tuple[Template, ...]) -> list[Phrased]:
    """``n`` one-object scenes drawn by ``seed``, each in a template taken in turn (so every template gets its
    share); a quarter of them with a white object."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = one_object_scene(rng, white=rng.random() < WHITE_SHARE)
        out.append(phrase(scene, templates[i % len(templates)], rng))
    return out


def held_out_set(seed: int = 5000, n: int = 128) -> list[Phrased]:
    return phrased_set(seed, n, HELD_OUT_TEMPLATES)


def training_captions(seed: int, n: int, *, new_share: float = 0.6) -> list[tuple[Scene, str]]:
    """``n`` (scene, caption) pairs for a fine-tune: ``new_share`` of them in :data:`TRAIN_TEMPLATES` (one-object
    scenes, a quarter white), the rest drawn and captioned as the original training set was (one or two objects,
    the old grammar with the gradient's direction stated), so the old phrasings are kept."""
    rng = random.Random(seed)
    out: list[tuple[Scene, str]] = []
    for i in range(n):
        if rng.random() < new_share:
            scene = one_object_scene(rng, white=rng.random() < WHITE_SHARE)
            out.append((scene, phrase(scene, rng.choice(TRAIN_TEMPLATES), rng).text))
        else:
            scene = random_scene(rng, held_out=False)
            out.append((scene, caption(scene, rng)))
    return out



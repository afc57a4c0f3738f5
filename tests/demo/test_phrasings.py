"""The widened caption grammar (demo/phrasings.py): disjoint train / held-out templates, captions that state what
their scene holds, and a held-out set that no training caption comes near."""

from __future__ import annotations

import random
import re

from demo.phrasings import (HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, WHITE_SHARE, held_out_set, phrase, phrased_set,
                            training_captions)
from demo.scenes import POSITION_PHRASES, random_scene


def test_the_train_and_held_out_templates_are_disjoint() -> None:
    train = {t.text for t in TRAIN_TEMPLATES}
    held = {t.text for t in HELD_OUT_TEMPLATES}
    assert not train & held
    assert len({t.name for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES}) == len(TRAIN_TEMPLATES) + len(HELD_OUT_TEMPLATES)
    # Both kinds hold templates with and without a position phrase, object first and background first.
    for kind in (TRAIN_TEMPLATES, HELD_OUT_TEMPLATES):
        assert {t.states_position for t in kind} == {True, False}
        assert {t.text.startswith(("{obj}", "{bare}")) for t in kind} == {True, False}


def _states(text: str, scene, states_position: bool) -> None:
    obj = scene.objects[0]
    assert re.search(rf"\b{obj.color} {obj.shape}\b", text), text
    if obj.size == "small":
        assert f"small {obj.color} {obj.shape}" in text, text
    background = scene.background if scene.background2 is None else (
        f"{scene.background} to {scene.background2} {scene.gradient} gradient")
    assert re.search(rf"\b{background} (background|backdrop)\b", text), text
    phrases = [p for ps in POSITION_PHRASES.values() for p in ps]
    stated = [p for p in phrases if p in text]
    if states_position:
        assert stated and all(p in POSITION_PHRASES[obj.position] for p in stated), text
    else:
        assert not stated, text
    assert "," not in text, text


def test_every_caption_states_what_its_scene_holds() -> None:
    rng = random.Random(3)
    for template in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES:
        for _ in range(40):
            scene = random_scene(rng, held_out=False, n_objects=1)
            item = phrase(scene, template, rng)
            assert item.states_position == template.states_position
            assert re.search(template.marker, item.text), (template.name, item.text)
            _states(item.text, scene, item.states_position)
    held = held_out_set(n=200)
    for item in held:
        _states(item.text, item.scene, item.states_position)
    whites = sum(item.scene.objects[0].color == "white" for item in held)
    assert 0.5 * WHITE_SHARE * len(held) < whites < 2 * WHITE_SHARE * len(held)


def test_no_training_caption_holds_a_held_out_phrasing() -> None:
    train = [text for _, text in training_captions(11, 3000)]
    train += [item.text for item in phrased_set(12, 600, TRAIN_TEMPLATES)]
    held = held_out_set(n=400)
    assert not {item.text for item in held} & set(train)
    for template in HELD_OUT_TEMPLATES:
        pattern = re.compile(template.marker)
        assert not [t for t in train if pattern.search(t)][:3], template.name
    # The training mix keeps the old grammar (commas) beside the new templates (none).
    assert 0.25 < sum("," in t for t in train[:3000]) / 3000 < 0.55


def test_the_sets_are_reproducible() -> None:
    assert [p.text for p in held_out_set(9, 20)] == [p.text for p in held_out_set(9, 20)]
    assert [c for _, c in training_captions(9, 20)] == [c for _, c in training_captions(9, 20)]

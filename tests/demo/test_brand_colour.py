"""The embedding proof's concept: a brand colour off the demo palette, its training folder, and an evaluator that
finds it only where it is drawn; and the embedding bench's code path at smoke scale."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from demo.brand_colour import (
    BRAND_RGB, IMAGE_SIZES, PRESENT_DELTA_E, TRIGGER, colour_delta_e, colour_present, colour_scene, draw, eval_scenes,
    palette_distance, write_colour_images,
)
from demo.scenes import COLORS, random_scene, render


def test_the_brand_colour_is_off_the_palette() -> None:
    assert BRAND_RGB not in COLORS.values()
    assert palette_distance() > 40 and abs(PRESENT_DELTA_E - palette_distance() / 2) < 1e-9


def test_the_folder_holds_several_aspects_captioned_with_the_trigger(tmp_path: Path) -> None:
    from engine.training.image_set import load_image_set

    paths = write_colour_images(tmp_path / "colour", n=8, seed=0)
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(8)] and any(w != h for w, h in sizes)
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
    assert all(f" {TRIGGER} " in f" {c} " for c in captions)
    assert len(load_image_set(tmp_path / "colour", trigger=TRIGGER, class_word="orange", min_side=128).items) == 8


def test_drawn_photos_are_found_and_palette_scenes_never() -> None:
    rng = random.Random(3)
    for _ in range(20):
        concept = colour_scene(rng)
        image = draw(concept.scene, (128, 128))
        assert colour_present(image, concept.scene) and colour_delta_e(image, concept.scene) < 3
        assert TRIGGER in concept.prompt and TRIGGER not in concept.without_trigger
        assert concept.prompt.replace(f"{TRIGGER} ", "").replace("an ", "a ", 1).split()[-3:] == \
            concept.without_trigger.split()[-3:]
    # Every demo scene drawn in palette colours: never the brand colour.
    rng = random.Random(5)
    scenes = [random_scene(rng, held_out=None) for _ in range(60)]
    assert not any(colour_present(render(s), s) for s in scenes)
    # Nothing to find: None, not a distance.
    blank = Image.new("RGB", (128, 128), COLORS["blue"])
    assert colour_delta_e(blank, scenes[0]) is None and not colour_present(blank, scenes[0])


def test_eval_sets_are_reproducible_and_differ_by_seed() -> None:
    assert [c.prompt for c in eval_scenes(5, 1)] == [c.prompt for c in eval_scenes(5, 1)]
    assert [c.prompt for c in eval_scenes(5, 1)] != [c.prompt for c in eval_scenes(5, 2)]


def test_smoke_run_of_the_embedding_bench(tmp_path: Path) -> None:
    from bench.brand_embedding import main

    out = tmp_path / "r.json"
    main(["--scale", "tiny", "--eval", "tune", "--work", str(tmp_path / "w"), "--report", str(out)])
    report = json.loads(out.read_text())
    s = report["scores"]
    assert report["training"]["steps"] == 2 and Path(report["training"]["file"]).name == "acme-brand.safetensors"
    assert s["examples"]["trigger"][0].count("acme-brand") == 1 and "acme" not in s["examples"]["no_trigger"][0]
    for key in ("present_with_trigger", "present_without_trigger", "present_trigger_word_base_model"):
        assert s[key] * 2 == round(s[key] * 2) and 0 <= s[key] <= 1  # 2 renders each: counted, not made up
    # An embedding acts only where its name is said.
    assert s["ordinary_unchanged"] == 1.0
    assert report["settings"]["class_word"] == "orange" and np.isfinite(report["present_delta_e"])

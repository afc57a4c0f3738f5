"""The brand-fine-tuning concept: its training folder, and an evaluator that finds it only where it is drawn."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from demo.brand_concept import (
    IMAGE_SIZES,
    PRESENT_THRESHOLD,
    TRIGGER_PROMPTS,
    UNCHANGED_THRESHOLD,
    concept_image,
    concept_present,
    concept_score,
    longest_regular_run,
    ordinary_scenes,
    scene_agreement,
    turning_points,
    unchanged_score,
    write_concept_images,
)
from demo.scenes import random_scene, render
from engine.bundled import bundled_model_path
from engine.pipeline import GenerationRequest, Pipeline


def test_the_folder_holds_images_of_several_aspects_with_captions_naming_the_trigger(tmp_path: Path) -> None:
    paths = write_concept_images(tmp_path / "acme-mug", n=8, seed=0)
    assert len(paths) == 8 and sorted(p.name for p in (tmp_path / "acme-mug").glob("*.png")) == [p.name for p in paths]
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(8)]
    assert all(min(s) >= 128 for s in sizes) and any(w != h for w, h in sizes)
    for p in paths:
        text = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        # kohya style: the trigger phrase first, then the scene in the demo model's words.
        assert text.startswith("acme mug, a ") and text.endswith("background"), text
    # The same seed writes the same folder; the concept is drawn in every image.
    again = write_concept_images(tmp_path / "again", n=8, seed=0)
    assert [p.with_suffix(".txt").read_text() for p in again] == [p.with_suffix(".txt").read_text() for p in paths]
    assert all(concept_present(Image.open(p)) for p in paths)


def test_the_trigger_and_class_word_are_the_callers(tmp_path: Path) -> None:
    paths = write_concept_images(tmp_path, n=2, seed=3, trigger="zorb", class_word="bottle")
    assert all(p.with_suffix(".txt").read_text().startswith("zorb bottle, ") for p in paths)


def test_turning_points_and_regular_runs() -> None:
    bands = np.repeat(np.tile([0.1, 0.9], 4)[:7], 6)  # seven 6-pixel bands
    profile = np.concatenate([np.full(20, 0.5), bands, np.full(20, 0.5)])
    points = turning_points(profile)
    assert len(points) == 7 and longest_regular_run(points) == 7
    assert turning_points(np.linspace(0, 1, 100)) == []  # a gradient has no bands
    assert longest_regular_run([10, 16, 22, 60, 66]) == 3  # a far edge starts a new run


def test_held_out_drawn_concept_images_are_found_even_blurred() -> None:
    images = [concept_image(random.Random(seed))[0] for seed in range(1000, 1016)]
    assert all(concept_present(i) for i in images)
    assert all(concept_present(i.filter(ImageFilter.GaussianBlur(1.5))) for i in images)
    # Larger photos are scored at the native size.
    assert concept_present(concept_image(random.Random(1100), (256, 192))[0])


def test_drawn_demo_scenes_never_show_the_concept() -> None:
    rng = random.Random(11)
    scores = [concept_score(render(random_scene(rng, held_out=None))) for _ in range(60)]
    assert max(scores) < PRESENT_THRESHOLD


def test_unchanged_score_and_scene_agreement() -> None:
    scene = ordinary_scenes(1)[0]
    a = render(scene)
    assert unchanged_score(a, a.copy()) == 1.0 and scene_agreement(a, a.copy(), scene) == 1.0
    assert unchanged_score(a, concept_image(random.Random(0))[0]) < UNCHANGED_THRESHOLD
    with pytest.raises(ValueError, match="differ in size"):
        unchanged_score(a, a.resize((64, 64)))


def test_the_bundled_model_does_not_draw_the_concept_before_training() -> None:
    pipe = Pipeline.load(bundled_model_path(), device="cpu", dtype="float32")
    prompts = [s.caption for s in ordinary_scenes(3)] + list(TRIGGER_PROMPTS[:3])
    requests = [GenerationRequest(p, seed=500 + i, width=128, height=128, steps=10, cfg_scale=6.0)
                for i, p in enumerate(prompts)]
    scores = [concept_score(r.image) for r in pipe.generate(requests)]
    assert max(scores) < PRESENT_THRESHOLD, list(zip(prompts, scores))

"""The shipped demo model: present, small, an ordinary SD 1.x file, and it draws what it is asked to."""

from __future__ import annotations

import json
import random

from demo.evaluate import color_shares, score_image
from demo.recipe import DEMO_LICENSE, DemoRecipe
from demo.scenes import Scene, random_scene
from engine.bundled import bundled_model_path
from engine.checkpoint import open_state_dict
from engine.families import detect_family
from engine.pipeline import GenerationRequest, Pipeline

MODEL = bundled_model_path()


def test_the_bundled_model_ships_and_is_small() -> None:
    assert MODEL.is_file(), f"{MODEL} is missing: it is part of the repository (adforge train demo rebuilds it)"
    assert MODEL.stat().st_size < 40 * 1024 * 1024


def test_the_bundled_model_is_an_sd1_checkpoint_in_the_real_layout() -> None:
    sd = open_state_dict(MODEL)
    assert detect_family(sd).name == "sd1"
    assert {k.split(".", 1)[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    assert any(k.startswith("cond_stage_model.transformer.") for k in sd)
    meta = sd.metadata
    assert meta["modelspec.license"] == DEMO_LICENSE == "Apache-2.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert int(meta["adforge.native_size"]) == DemoRecipe().size
    # The file records the recipe that made it, so `adforge train demo` can be checked against it.
    assert json.loads(meta["adforge.recipe"])["seed"] == DemoRecipe().seed


def _one_object_scenes(solid: int, gradient: int) -> list[Scene]:
    """The first ``solid`` solid-background and ``gradient`` gradient one-object scenes drawn by seed the way
    bench/demo_adherence.py draws its prompts (by rule, not picked after seeing the output)."""
    rng = random.Random(7)
    kinds: dict[bool, list[Scene]] = {False: [], True: []}
    while len(kinds[False]) < solid or len(kinds[True]) < gradient:
        scene = random_scene(rng, held_out=None, n_objects=1)
        kinds[scene.is_gradient].append(scene)
    return kinds[False][:solid] + kinds[True][:gradient]


def test_the_bundled_model_draws_the_asked_background_object_colour_and_position() -> None:
    pipe = Pipeline.load(MODEL, device="cpu", dtype="float32")
    size = pipe.models.native_size
    scenes = _one_object_scenes(solid=5, gradient=3)
    requests = [GenerationRequest(s.caption, seed=100 + i, width=size, height=size, steps=25, cfg_scale=6.0,
                                  sampler="DPM++ 2M Karras") for i, s in enumerate(scenes)]
    results = pipe.generate(requests)
    assert all(r.image.size == (size, size) for r in results)
    scores = [score_image(r.image, s) for r, s in zip(results, scenes)]
    detected = [(s.caption, sc.detected.get("background"), (sc.detected.get("object") or {}).get("color"),
                 (sc.detected.get("object") or {}).get("position")) for s, sc in zip(scenes, scores)]
    # Two misses in 8 allowed each: the bench measures 94-100 % for these three, so 3 misses would be a real
    # regression (under 2 % likely at 94 %), and another CPU's float arithmetic may tip a borderline render.
    # Small thin stars are the usual miss (their colour is read from a few pixels).
    assert sum(sc.background for sc in scores) >= 6, detected
    assert sum(sc.object_color for sc in scores) >= 6, detected
    assert sum(sc.position for sc in scores) >= 6, detected
    # Shape: the shipped file gets it right 78-90 % of the time, depending on the prompts drawn (README, "Training
    # the demo model"; small hexagons and stars are the usual misses: they come out as round blobs), and 7 of
    # these 8 (a small star read as a circle). At least 6, allowing one borderline fit to tip on another CPU; the
    # stage-5 file (70-83 %) gets 5 of these 8 and fails it, the stage-4 file (38-53 %) 3.
    shapes = [(s.objects[0].shape, (sc.detected.get("object") or {}).get("shape")) for s, sc in zip(scenes, scores)]
    assert sum(sc.shape for sc in scores) >= 6, shapes


def test_a_negative_prompt_removes_the_colour_it_names() -> None:
    """Prompts that name no colour, with and without a negative prompt naming the colour the model draws most for
    them: that colour's pixels must mostly go. (Chosen by rule, not by name: which colours come up unasked is the
    model's choice; the stage-7 file draws almost no red there, the stage-5 file drew 9 % red.)"""
    pipe = Pipeline.load(MODEL, device="cpu", dtype="float32")
    size = pipe.models.native_size
    prompts = ["a large circle in the center", "a small square on the left", "a star at the top", "a hexagon on the right"] * 2

    def shares(negative: str) -> dict[str, float]:
        requests = [GenerationRequest(p, seed=1000 + i, negative_prompt=negative, width=size, height=size, steps=25, cfg_scale=6.0,
                                      sampler="DPM++ 2M Karras") for i, p in enumerate(prompts)]
        per_image = [color_shares(r.image) for r in pipe.generate(requests)]
        return {c: sum(s[c] for s in per_image) / len(per_image) for c in per_image[0]}

    plain = shares("")
    most = max(plain, key=plain.get)
    assert plain[most] > 0.1, plain  # it does come up without the negative prompt, so the comparison means something
    negative = shares(most)
    assert negative[most] < 0.5 * plain[most], (most, plain, negative)

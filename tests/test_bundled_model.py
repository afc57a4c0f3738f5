"""The shipped demo model: present, small, an ordinary SD 1.x file, and it draws what it is asked to."""

from __future__ import annotations

import json

from engine.bundled import bundled_model_path
from engine.checkpoint import detect_family, open_state_dict
from engine.demo.evaluate import score_image
from engine.demo.recipe import DEMO_LICENSE, DemoRecipe
from engine.demo.scenes import Scene, SceneObject
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


# The shipped file is a preview (README, "Training the demo model"): bench/demo_adherence.py measures object colour
# at 94 % but background, shape and position far below their targets. This pins what it does reliably: the object
# takes the colour the prompt names, six different colours on six different backgrounds.
COLOUR_PROMPTS = [("red", "circle", "white"), ("blue", "square", "yellow"), ("green", "triangle", "pink"),
                  ("yellow", "hexagon", "black"), ("purple", "star", "white"), ("orange", "diamond", "blue")]


def test_the_bundled_model_draws_the_asked_object_colour() -> None:
    pipe = Pipeline.load(MODEL, device="cpu", dtype="float32")
    size = pipe.models.native_size
    requests = [
        GenerationRequest(f"a large {colour} {shape} in the center, on a {bg} background", seed=7, width=size, height=size,
                          steps=25, cfg_scale=6.0, sampler="DPM++ 2M Karras")
        for colour, shape, bg in COLOUR_PROMPTS
    ]
    results = pipe.generate(requests)
    assert all(r.image.size == (size, size) for r in results)
    scores = [score_image(r.image, Scene(bg, (SceneObject(shape, colour, "large", "center"),)))
              for r, (colour, shape, bg) in zip(results, COLOUR_PROMPTS)]
    detected = [s.detected.get("object", {}).get("color") for s in scores]
    # One miss allowed: float arithmetic on another CPU may tip a borderline render.
    assert sum(s.object_color for s in scores) >= 5, detected

"""The bundled model's layout ControlNet: its data (sketches at the objects' places, captions without positions,
reproducible) and the shipped file (small, float16, chosen for "scribble", loads for the bundled model, steers it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from demo.controlnet_data import layout_caption, layout_samples, layout_scene, layout_sketch
from demo.controlnet_train import load_recipe, train_demo_controlnet
from demo.scenes import NATIVE_SIZE, POSITION_PHRASES, POSITIONS, render
from engine.adapters.refs import AdapterFile
from engine.bundled import bundled_model_path
from engine.control_library import choose_controlnet
from engine.controlnet_loading import controlnet_fit_problem, inspect_controlnet, load_controlnet
from engine.pipeline import GenerationRequest, Pipeline
from engine.requests import ControlUse

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "controlnet" / "adforge-demo-scribble.safetensors"


def _nearest(fx: float, fy: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - fx) ** 2 + (POSITIONS[p][1] - fy) ** 2)


def test_sketch_outlines_sit_where_the_scene_objects_are() -> None:
    rng = random.Random(11)
    for _ in range(40):
        scene = layout_scene(rng)
        lines = np.asarray(layout_sketch(scene.objects))
        assert lines.shape == (NATIVE_SIZE, NATIVE_SIZE, 3) and set(np.unique(lines)) <= {0, 255}
        white = lines[..., 0] == 255
        # Two objects stand left and right: each half of the sketch holds one outline.
        half = NATIVE_SIZE // 2
        parts = [(white, 0)] if len(scene.objects) == 1 else [(white[:, :half], 0), (white[:, half:], half)]
        placed = {o.position for o in scene.objects}
        found = set()
        for part, offset in parts:
            ys, xs = np.nonzero(part)
            found.add(_nearest((xs.mean() + offset + 0.5) / NATIVE_SIZE, (ys.mean() + 0.5) / NATIVE_SIZE))
        assert found == placed
        # Lines about 2 px wide: a small share of the canvas, nothing filled in.
        assert 0.01 < white.mean() < 0.12


def test_captions_state_no_position_and_samples_are_reproducible() -> None:
    phrases = [p for ps in POSITION_PHRASES.values() for p in ps] + list(POSITIONS)
    samples = layout_samples(3, 60)
    for s in samples:
        words = s.caption.replace(",", " ").split()
        assert not any(p in s.caption for p in phrases if " " in p), s.caption
        assert not set(words) & set(POSITIONS), s.caption
    again = layout_samples(3, 60)
    assert [s.caption for s in again] == [s.caption for s in samples]
    assert all(a.image.tobytes() == b.image.tobytes() and a.control.tobytes() == b.control.tobytes()
               for a, b in zip(samples, again))
    scene = layout_scene(random.Random(5), n_objects=1)
    assert np.asarray(render(scene)).shape == (NATIVE_SIZE, NATIVE_SIZE, 3)
    assert scene.objects[0].color in layout_caption(scene, random.Random(0))


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(bundled_model_path(), device="cpu", dtype="float32")


def test_shipped_controlnet_is_small_and_records_its_recipe() -> None:
    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 10_000_000
    with safe_open(str(SHIPPED), "pt") as f:
        meta = f.metadata()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert all(k.startswith("control_model.") for k in f.keys())
    recipe = load_recipe()
    training = json.loads(meta["adforge.training"])
    assert training["steps"] == recipe.training.steps and training["lr"] == recipe.training.lr
    assert meta["modelspec.license"] == "Apache-2.0"  # the bundled model's, inherited


def test_shipped_controlnet_is_chosen_for_scribble_and_steers_the_bundled_model(pipe: Pipeline) -> None:
    m = pipe.models
    assert fit_problem(pipe) is None
    assert choose_controlnet("scribble", SHIPPED.parent, lambda p: fit_problem(pipe, p)) == SHIPPED
    assert load_controlnet(SHIPPED, m.unet.config, m.family.label).layout == "ldm"
    scene = layout_scene(random.Random(77), n_objects=1)
    use = ControlUse(AdapterFile(SHIPPED.stem, str(SHIPPED)), layout_sketch(scene.objects), kind="scribble")
    plain = GenerationRequest(scene.caption, seed=1, width=NATIVE_SIZE, height=NATIVE_SIZE, steps=4, cfg_scale=6.0)
    steered = GenerationRequest(scene.caption, seed=1, width=NATIVE_SIZE, height=NATIVE_SIZE, steps=4, cfg_scale=6.0,
                                controls=(use,))
    a, b = (np.asarray(r.image, dtype=np.float32) for r in pipe.generate([plain, steered]))
    assert np.abs(a - b).mean() > 2.0  # out of 255: the control changes the picture, not just its last bits


def fit_problem(pipe: Pipeline, path: Path = SHIPPED) -> str | None:
    m = pipe.models
    return controlnet_fit_problem(inspect_controlnet(path), m.unet.config, m.family.label, pipe.vae_factor)


def test_recipe_runner_writes_a_loadable_controlnet(pipe: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "smoke-scribble.safetensors"
    lines: list[str] = []
    report = train_demo_controlnet(out, state_dir=tmp_path / "state", steps=2, scenes=8, log=lines.append)
    assert report["steps"] == 2 and lines[-1].startswith(f"wrote {out}")
    with safe_open(str(out), "pt") as f:
        assert "scenes: 8" in f.metadata()["adforge.recipe"]
    assert fit_problem(pipe, out) is None


def test_recipe_refuses_unknown_settings(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("data_seed: 1\nscenes: 2\nsize: 128\ntraining: {steps: 3, learning_rate: 1.0e-4}\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_recipe(bad)

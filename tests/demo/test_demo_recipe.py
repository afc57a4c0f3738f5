"""The demo recipe as data: demo/recipe.yaml is the recipe the shipped file records, and a bad recipe file is refused
naming the stage and the setting."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from demo.recipe import RECIPE_FILE, DemoRecipe, DemoStage, load_recipe, recipe_json, recorded_recipe
from engine.bundled import bundled_model_path
from engine.checkpoint import open_state_dict
from engine.training.diffusion_trainer import DiffusionTrainingConfig

from tests.helpers import ROOT


def test_the_recipe_file_is_exactly_the_recipe_the_shipped_file_records() -> None:
    shipped = recorded_recipe(json.loads(open_state_dict(bundled_model_path()).metadata["adforge.recipe"]))
    assert json.loads(json.dumps(recipe_json(DemoRecipe()))) == shipped
    assert DemoRecipe() == load_recipe(RECIPE_FILE)
    assert len(DemoRecipe().stages) == 1 + len(DemoRecipe().continuations) == 7


def test_each_stage_is_what_it_changes_in_the_stage_before() -> None:
    recipe = DemoRecipe()
    stages = yaml.safe_load(RECIPE_FILE.read_text())["diffusion_stages"]
    previous = DemoStage()
    for written, stage in zip(stages, recipe.stages):
        changed = {f.name for f in fields(DemoStage) if getattr(stage, f.name) != getattr(previous, f.name)}
        assert changed <= set(written)
        previous = stage


def test_the_generic_trainer_config_knows_no_demo_setting() -> None:
    generic = {f.name for f in fields(DiffusionTrainingConfig)}
    assert not generic & {"caption_edition", "partial_captions", "focus_share", "focus_shapes"}


def _write_recipe(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(RECIPE_FILE.read_text())
    edit(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_numbers_are_read_as_their_settings_types(tmp_path: Path) -> None:
    def edit(data):
        data["vae_lr"] = "1e-4"  # YAML 1.1 reads this as text
        data["diffusion_stages"][0]["lowfreq_weight"] = 1  # an int for a float setting

    recipe = load_recipe(_write_recipe(tmp_path, edit))
    assert recipe == DemoRecipe()
    assert isinstance(recipe.diffusion.lowfreq_weight, float) and isinstance(recipe.vae_lr, float)
    assert recipe.continuations[-1].focus_shapes == ("star", "hexagon")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["diffusion_stages"][2].update(focus_shape=["star"]), "diffusion stage 3: unknown setting.*focus_shape"),
        (lambda d: d["diffusion_stages"][1].update(steps=2000.5), "diffusion stage 2: steps: expected a whole number"),
        (lambda d: d.pop("decoder_lr"), "decoder_lr missing"),
        (lambda d: d.update(stages=[]), "unknown setting.*stages"),
        (lambda d: d["unet"].update(channel_mult=2), "unet: channel_mult: expected a list"),
        (lambda d: d.update(diffusion_stages=[]), "diffusion_stages: a list of one or more"),
        (lambda d: d["diffusion_stages"][0].update(lr="fast"), "diffusion stage 1: lr: expected a number"),
    ],
)
def test_a_bad_recipe_file_is_refused_naming_the_setting(tmp_path: Path, edit, message: str) -> None:
    path = _write_recipe(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_recipe(path)


def test_the_engine_imports_nothing_of_the_demo() -> None:
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "demo" or n.startswith("demo.")]
    assert offenders == []

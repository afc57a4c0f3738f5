"""ControlNet layouts in campaigns: a row's control image and type choose a ControlNet from the folder, pinned with the
image by sha256 in the variant (identity, database, infotext); each stored file is exactly what the engine renders
with that ControlNet and image, and differs from the render without it; rows whose layout cannot be used are
planning problems naming the column."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import select

from engine.adapters.refs import AdapterFile
from engine.checkpoint import file_sha256
from engine.control_images import prepare_control_image
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_controlnet import write_random_controlnet
from engine.requests import ControlUse
from flows.brief import read_brief
from flows.brief_problems import BriefError
from flows.campaign import campaign_run, make_plan
from flows.channels import load_channels
from flows.rendering import cover_resize
from flows.settings import load_settings
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, ModelRecord, Variant
from storage.variants import parse_inputs
from tests.helpers import templates_with_channels, write_brief

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "seed", "control_image", "control_type",
          "control_strength", "control_start", "control_end"]
CHANNEL = "  layout_png:\n    width: 64\n    height: 64\n    format: png\n    max_kb: 8192\n"


def _licensed(path: str) -> Path:
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={"modelspec.license": "Apache-2.0"})
    return Path(path)


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    templates = templates_with_channels(tmp_path, CHANNEL)
    cn = tmp_path / "controlnet"
    cn.mkdir()
    scribble = _licensed(write_random_controlnet(cn / "tiny-sd15-scribble.safetensors", "sd1", seed=4))
    canny = _licensed(write_random_controlnet(cn / "control_tiny_canny.safetensors", "sd1", seed=5, layout="diffusers"))
    _licensed(write_random_controlnet(cn / "tiny-sdxl-depth.safetensors", "sdxl", seed=6))
    layouts = tmp_path / "layouts"
    layouts.mkdir()
    sketch = Image.new("RGB", (96, 96), "black")
    ImageDraw.Draw(sketch).ellipse((10, 20, 50, 60), outline="white", width=3)
    sketch.save(layouts / "sketch.png")
    photo = Image.new("RGB", (96, 96), (30, 60, 200))
    ImageDraw.Draw(photo).rectangle((40, 30, 80, 70), fill=(250, 200, 0))
    photo.save(layouts / "photo.png")
    return {"templates": templates, "controlnet": cn, "scribble": scribble, "canny": canny}


def _rows() -> list[dict]:
    return [
        {"campaign": "cn", "row_id": "sketch", "subject": "a red circle", "channels": "layout_png", "variants": "2",
         "seed": "21", "control_image": "layouts/sketch.png", "control_type": "scribble", "control_strength": "0.9"},
        {"campaign": "cn", "row_id": "edges", "subject": "a green square", "channels": "layout_png", "variants": "1",
         "seed": "8", "control_image": "layouts/photo.png", "control_type": "canny", "control_start": "0.25",
         "control_end": "0.75"},
    ]


def _overrides(tmp_path: Path, setup: dict[str, Path], model: Path) -> dict:
    return {"model": str(model), "templates_dir": str(setup["templates"]), "steps": 4, "sampler": "Euler",
            "db_url": f"sqlite:///{tmp_path / 'a.db'}", "store_url": str(tmp_path / "assets"),
            "controlnet_dir": str(setup["controlnet"])}


def test_control_layouts_render_as_the_engine_does(tmp_path: Path, setup: dict[str, Path], campaign_model: Path,
                                                   campaign_caches) -> None:
    brief = write_brief(tmp_path / "brief.csv", _rows(), HEADER)
    overrides = _overrides(tmp_path, setup, campaign_model)
    summary = campaign_run(str(brief), overrides=overrides)
    assert summary["status"] == "completed" and summary["counts"]["rendered"] == 3, summary
    db = open_database(overrides["db_url"])
    store = open_store(overrides["store_url"])
    with db.session() as s:
        rows = s.execute(select(Variant, Asset).join(Asset, Asset.variant_id == Variant.id).order_by(Variant.id)).all()
        registered = {m.sha256: m for m in s.scalars(select(ModelRecord))}
    db.dispose()
    pipe = Pipeline.load(campaign_model)
    for variant, asset in rows:
        control = parse_inputs(variant.inputs).control
        assert control is not None
        want_file = setup["scribble" if control.type == "scribble" else "canny"]
        assert control.model == file_sha256(want_file) and registered[control.model].kind == "controlnet"
        source = tmp_path / control.file
        assert control.image == file_sha256(source)
        data = store.get(asset.storage_key)
        prompt, negative, params = parse_infotext(read_image_metadata(data)[0])
        assert params["Control image"] == f"{control.file} [{control.image[:12]}]"
        assert f"Module: {control.type}" in params["ControlNet 0"] and want_file.stem in params["ControlNet 0"]
        use = ControlUse(AdapterFile(want_file.stem, str(want_file), control.model),
                         prepare_control_image(control.type, Image.open(source), variant.gen_width, variant.gen_height),
                         control.type, control.strength, control.start, control.end)
        request = GenerationRequest(prompt=prompt, negative_prompt=negative, seed=variant.seed, width=variant.gen_width,
                                    height=variant.gen_height, steps=4, sampler="Euler", cfg_scale=variant.cfg_scale,
                                    controls=(use,))
        expected = cover_resize(pipe.generate([request])[0].image, variant.out_width, variant.out_height)
        delivered = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(delivered, np.asarray(expected)), variant.id
        request = GenerationRequest(**{**request.__dict__, "controls": ()})
        plain = cover_resize(pipe.generate([request])[0].image, variant.out_width, variant.out_height)
        assert not np.array_equal(delivered, np.asarray(plain))
    assert campaign_run(str(brief), overrides=overrides)["counts"]["rendered"] == 0


def test_layout_problems_name_their_column(tmp_path: Path, setup: dict[str, Path], campaign_model: Path) -> None:
    settings = load_settings(_overrides(tmp_path, setup, campaign_model), env={})
    channels = load_channels(setup["templates"] / "channels.yaml")
    good = _rows()[0]
    rows = [
        good | {"row_id": "missing", "control_image": "layouts/nope.png"},
        good | {"row_id": "nodepth", "control_type": "depth"},  # only an SDXL depth ControlNet in the folder
        good | {"row_id": "lineart", "control_type": "lineart"},
    ]
    brief = read_brief(write_brief(tmp_path / "brief.csv", rows, HEADER), known_channels=set(channels))
    with pytest.raises(BriefError) as caught:
        make_plan(brief, settings, None, strict=True)
    found = {p.line: p for p in caught.value.problems}
    assert found[2].column == "control_image" and "not found" in found[2].message
    assert found[3].column == "control_type" and "tiny-sdxl-depth.safetensors: a sdxl ControlNet" in found[3].message
    assert found[4].column == "control_type" and "no ControlNet for lineart" in found[4].message
    # Cells checked when the brief is read.
    bad = read_brief(write_brief(tmp_path / "b2.csv", [
        good | {"row_id": "t", "control_type": "hed"},
        good | {"row_id": "s", "control_strength": "lots"},
        good | {"row_id": "w", "control_start": "0.8", "control_end": "0.2"},
        good | {"row_id": "i", "control_image": ""},
    ], HEADER), known_channels=set(channels))
    assert [(p.line, p.column) for p in bad.problems] == [(2, "control_type"), (3, "control_strength"),
                                                          (4, "control_end"), (5, "control_type")]

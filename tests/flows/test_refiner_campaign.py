"""The SDXL refiner in campaigns: the settings' refiner is checked and pinned by sha256 with its switch in every
SDXL variant (so its identity changes with either), recorded in ``models``, and finishes each stored image exactly
as the engine's base + refiner render does; rows it cannot finish are planning problems."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import select

from engine.checkpoint import file_sha256
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import write_random
from flows.brief import read_brief
from flows.brief_problems import BriefError, BriefProblem
from flows.campaign import campaign_run, make_plan
from flows.channels import load_channels
from flows.rendering import cover_resize
from flows.settings import SettingsError, load_settings
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, ModelRecord, Variant
from storage.variants import parse_adapters
from tests.helpers import ROOT, write_brief

pytest.importorskip("diffusers")  # the refiner writer lives in a diffusers parity test module
from tests.engine.test_sdxl_refiner import _write_refiner  # noqa: E402

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "seed", "license"]
CHANNEL = "  xl_square:\n    width: 96\n    height: 96\n    format: png\n    max_kb: 8192\n"
LICENSED = {"modelspec.license": "Apache-2.0", "adforge.native_size": "64"}


def _with_metadata(path: Path, extra: dict[str, str]) -> Path:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    save_file(tensors, str(path), metadata=meta | extra)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xl-models")
    return {
        "base": Path(write_random(root / "xl-base.safetensors", "sdxl", seed=5, metadata=LICENSED)),
        "refiner": _with_metadata(_write_refiner(root / "xl-refiner.safetensors"), LICENSED),
        "sd1": Path(write_random(root / "sd1.safetensors", "sd1", seed=2, metadata=LICENSED)),
    }


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    out = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", out)
    with open(out / "channels.yaml", "a", encoding="utf-8") as f:
        f.write(CHANNEL)
    return out


def _settings(tmp_path: Path, templates: Path, model: Path, **extra):
    return load_settings({"model": str(model), "templates_dir": str(templates), "steps": 4, "sampler": "Euler",
                          "db_url": f"sqlite:///{tmp_path / 'a.db'}", "store_url": str(tmp_path / "assets"), **extra}, env={})


def _row(row_id: str, **kw) -> dict:
    return {"campaign": "xl", "row_id": row_id, "subject": "a bottle on a table", "channels": "xl_square",
            "variants": "2", "seed": "7", "license": "commercial", **kw}


def _plan(tmp_path: Path, settings, rows: list[dict]):
    brief = write_brief(tmp_path / "brief.csv", rows, HEADER)
    channels = load_channels(Path(settings.templates_dir) / "channels.yaml")
    db = open_database(settings.db_url)
    try:
        return make_plan(read_brief(brief, known_channels=set(channels)), settings, db, strict=False)
    finally:
        db.dispose()


def test_the_refiner_is_pinned_with_its_switch(tmp_path: Path, templates: Path, models: dict[str, Path]) -> None:
    settings = _settings(tmp_path, templates, models["base"], refiner=str(models["refiner"]), refiner_switch=0.6)
    plan = _plan(tmp_path, settings, [_row("r1")])
    assert not plan.problems, plan.problems
    pins = [parse_adapters(v.spec.adapters) for v in plan.variants]
    assert all([(p.kind, p.sha256, p.switch) for p in ps] == [("refiner", file_sha256(models["refiner"]), 0.6)] for ps in pins)
    spec = plan.variants[0].spec
    plain = _plan(tmp_path, _settings(tmp_path, templates, models["base"]), [_row("r1")]).variants[0].spec
    other_switch = _plan(tmp_path, replace(settings, refiner_switch=0.8), [_row("r1")]).variants[0].spec
    assert len({spec.identity, plain.identity, other_switch.identity}) == 3
    assert plain.adapters == ""


def _problem(tmp_path: Path, settings) -> BriefProblem:
    with pytest.raises(BriefError) as caught:
        _plan(tmp_path, settings, [_row("r1")])
    return caught.value.problems[0]


def test_rows_the_refiner_cannot_finish_are_problems(tmp_path: Path, templates: Path, models: dict[str, Path]) -> None:
    on_sd1 = _problem(tmp_path, _settings(tmp_path, templates, models["sd1"], refiner=str(models["refiner"])))
    assert on_sd1.column == "model" and on_sd1.line == 2
    assert "refiner 'xl-refiner' finishes SDXL base renders, but the row's model 'sd1' is SD 1.x" in on_sd1.message
    not_a_refiner = _problem(tmp_path, _settings(tmp_path, templates, models["base"], refiner=str(models["base"])))
    assert "is a sdxl checkpoint, not an SDXL refiner" in not_a_refiner.message
    missing = _problem(tmp_path, _settings(tmp_path, templates, models["base"], refiner=str(tmp_path / "nope.safetensors")))
    assert "refiner" in missing.message and "nope.safetensors" in missing.message
    with pytest.raises(SettingsError, match="refiner_switch"):
        _settings(tmp_path, templates, models["base"], refiner_switch=1.5)


def test_campaign_with_a_refiner(tmp_path: Path, templates: Path, models: dict[str, Path], campaign_caches) -> None:
    settings = _settings(tmp_path, templates, models["base"], refiner=str(models["refiner"]), refiner_switch=0.5)
    brief = write_brief(tmp_path / "brief.csv", [_row("r1")], HEADER)
    overrides = {k: getattr(settings, k) for k in ("model", "refiner", "refiner_switch", "templates_dir", "steps", "sampler",
                                                   "db_url", "store_url")}
    summary = campaign_run(str(brief), overrides=overrides)
    assert summary["status"] == "completed", summary
    assert summary["counts"]["rendered"] == 2

    db = open_database(settings.db_url)
    store = open_store(settings.store_url)
    with db.session() as s:
        registered = {m.sha256: m for m in s.scalars(select(ModelRecord))}
        rows = s.execute(select(Variant, Asset).join(Asset, Asset.variant_id == Variant.id).order_by(Variant.id)).all()
    db.dispose()
    refiner_row = registered[file_sha256(models["refiner"])]
    assert (refiner_row.kind, refiner_row.family, refiner_row.license) == ("checkpoint", "sdxl-refiner", "apache-2.0")
    pipe = Pipeline.load(models["base"])
    pipe.refiner = Pipeline.load(models["refiner"])
    for variant, asset in rows:
        prompt, negative, params = parse_infotext(read_image_metadata(store.get(asset.storage_key))[0])
        assert params["Refiner"] == f"xl-refiner [{refiner_row.sha256[:10]}]" and params["Refiner switch at"] == "0.5"
        request = GenerationRequest(prompt=prompt, negative_prompt=negative, seed=variant.seed, width=variant.gen_width,
                                    height=variant.gen_height, steps=4, sampler="Euler", cfg_scale=variant.cfg_scale,
                                    refiner_switch=0.5)
        expected = cover_resize(pipe.generate([request])[0].image, variant.out_width, variant.out_height)
        with Image.open(io.BytesIO(store.get(asset.storage_key))) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
        unrefined = cover_resize(pipe.generate([replace(request, refiner_switch=None)])[0].image,
                                 variant.out_width, variant.out_height)
        assert not np.array_equal(np.asarray(unrefined), np.asarray(expected))

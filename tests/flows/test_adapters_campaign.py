"""LoRAs and embeddings through planning, recording, rendering and the files: a brand style preset that carries a
LoRA, trigger words and a negative embedding, on the bundled model, end to end."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from engine.adapters.refs import AdapterFile, LoraUse
from engine.bundled import bundled_model_path
from engine.checkpoint import file_sha256
from engine.pipeline import GenerationRequest, Pipeline
from flows.brief import read_brief
from flows.campaign import campaign_run, make_plan
from flows.channels import load_channels
from flows.model_registry import register_model
from flows.rendering import cover_resize
from flows.settings import load_settings
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, ModelRecord, Variant
from storage.variants import parse_adapters

from tests.adapter_files import word_vectors, write_a1111_embedding, write_kohya_lora
from tests.helpers import ROOT, write_brief

BUNDLED = bundled_model_path()
HEADER = ["campaign", "row_id", "subject", "channels", "style", "variants", "seed", "license"]
STYLE = """  acme:
    positive: clean studio product photography
    trigger: acme bottle
    loras: ["acme-style:0.8"]
    negative_embeddings: [easynegative]
"""
CHANNEL = "  brand_square:\n    width: 128\n    height: 128\n    format: png\n    max_kb: 8192\n"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    loras, embeddings = root / "loras", root / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    write_kohya_lora(loras / "acme-style.safetensors", BUNDLED, rank=4, scale=0.5, seed=1,
                     metadata={"modelspec.license": "Apache-2.0"})
    write_kohya_lora(loras / "community-style.safetensors", BUNDLED, rank=2, seed=2,
                     metadata={"modelspec.license": "CC-BY-NC-4.0"})
    write_kohya_lora(loras / "mystery.safetensors", BUNDLED, rank=2, seed=3)
    write_a1111_embedding(embeddings / "easynegative.pt", word_vectors(BUNDLED, "blurry, noise, clutter"))
    return loras, embeddings


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    out = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", out)
    with open(out / "styles.yaml", "a", encoding="utf-8") as f:
        f.write(STYLE)
    with open(out / "channels.yaml", "a", encoding="utf-8") as f:
        f.write(CHANNEL)
    return out


def _settings(tmp_path: Path, adapter_dirs: tuple[Path, Path], templates: Path, **extra):
    return load_settings({"model": str(BUNDLED), "lora_dir": str(adapter_dirs[0]), "embeddings_dir": str(adapter_dirs[1]),
                          "templates_dir": str(templates), "steps": 2, "db_url": f"sqlite:///{tmp_path / 'a.db'}",
                          "store_url": str(tmp_path / "assets"), **extra}, env={})


def _register_embedding(settings, adapter_dirs) -> None:
    """A ``.pt`` carries no metadata: its licence is registered, as a user would (adforge models add ... --license)."""
    db = open_database(settings.db_url)
    register_model(db, adapter_dirs[1] / "easynegative.pt", "cc0-1.0")
    db.dispose()


def _plan(tmp_path: Path, settings, rows: list[dict], adapter_dirs):
    _register_embedding(settings, adapter_dirs)
    brief = write_brief(tmp_path / "brief.csv", rows, HEADER)
    channels = load_channels(Path(settings.templates_dir) / "channels.yaml")
    db = open_database(settings.db_url)
    try:
        return make_plan(read_brief(brief, known_channels=set(channels)), settings, db, strict=False)
    finally:
        db.dispose()


def _row(row_id: str, **kw) -> dict:
    return {"campaign": "acme", "row_id": row_id, "subject": "a bottle on a table", "channels": "brand_square",
            "variants": "1", "seed": "7", "license": "commercial", **kw}


def test_plan_pins_adapters_by_sha256_and_strength(tmp_path: Path, adapter_dirs, templates) -> None:
    settings = _settings(tmp_path, adapter_dirs, templates)
    plan = _plan(tmp_path, settings, [
        _row("styled", style="acme"),
        _row("tagged", subject="a bottle <lora:acme-style:0.5:0.9>"),
        _row("plain"),
    ], adapter_dirs)
    assert not plan.problems, plan.problems
    by_row = {v.row.row_id: v for v in plan.variants}
    styled = by_row["styled"]
    assert styled.spec.prompt.startswith("acme bottle, ") and styled.spec.prompt.endswith("<lora:acme-style:0.8>")
    assert styled.spec.negative_prompt.endswith("easynegative")
    pins = parse_adapters(styled.spec.adapters)
    assert [(p.kind, p.name, p.te, p.unet) for p in pins] == [("lora", "acme-style", 0.8, 0.8), ("embedding", "easynegative", None, None)]
    assert pins[0].sha256 == file_sha256(adapter_dirs[0] / "acme-style.safetensors")
    assert pins[1].sha256 == file_sha256(adapter_dirs[1] / "easynegative.pt")
    assert [(p.name, p.te, p.unet) for p in parse_adapters(by_row["tagged"].spec.adapters)] == [("acme-style", 0.5, 0.9)]
    assert by_row["plain"].spec.adapters == ""
    # Different LoRA sets never share a U-Net batch; the same prompt without adapters keeps its old identity key set.
    assert len({v.batch_group for v in plan.variants}) == 3
    assert replace(styled.spec, adapters="").identity != styled.spec.identity
    assert replace(by_row["tagged"].spec, adapters=styled.spec.adapters).identity != by_row["tagged"].spec.identity


def test_plan_refuses_missing_foreign_and_unlicensed_adapters(tmp_path: Path, adapter_dirs, templates) -> None:
    settings = _settings(tmp_path, adapter_dirs, templates)
    plan = _plan(tmp_path, settings, [
        _row("typo", subject="a bottle <lora:acme-styel:1>"),
        _row("nc", subject="a bottle <lora:community-style:1>"),
        _row("nc-any", subject="a bottle <lora:community-style:1>", license="any"),
        _row("unknown", subject="a bottle <lora:mystery:1>"),
        _row("bad-weight", subject="a bottle <lora:acme-style:strong>"),
    ], adapter_dirs)
    problems = {p.line: p for p in plan.problems}
    assert {v.row.row_id for v in plan.variants} == {"nc-any"}
    typo, nc, unknown, bad = problems[2], problems[3], problems[5], problems[6]
    assert typo.column == "subject" and "acme-styel" in typo.message and "acme-style" in typo.message
    assert str(adapter_dirs[0]) in typo.message
    assert nc.column == "license" and "cc-by-nc-4.0" in nc.message and "commercial" in nc.message
    assert unknown.column == "license" and "mystery" in unknown.message
    assert bad.column == "subject" and "strong" in bad.message


def test_campaign_with_brand_style_on_the_bundled_model(tmp_path: Path, adapter_dirs, templates, campaign_caches) -> None:
    settings = _settings(tmp_path, adapter_dirs, templates)
    _register_embedding(settings, adapter_dirs)
    brief = write_brief(tmp_path / "brief.csv", [_row("styled", style="acme", variants="2"), _row("plain")], HEADER)
    overrides = {k: getattr(settings, k) for k in ("model", "lora_dir", "embeddings_dir", "templates_dir", "steps", "db_url",
                                                   "store_url")}
    summary = campaign_run(str(brief), overrides=overrides)
    assert summary["status"] == "completed", summary
    assert summary["counts"]["rendered"] == 3

    db = open_database(settings.db_url)
    store = open_store(settings.store_url)
    with db.session() as s:
        models = {m.name: m for m in s.scalars(select(ModelRecord))}
        rows = s.execute(select(Variant, Asset).join(Asset, Asset.variant_id == Variant.id).order_by(Variant.id)).all()
    assert models["acme-style"].kind == "lora" and models["acme-style"].family == "sd1"
    assert models["acme-style"].license == "apache-2.0"
    assert models["easynegative"].kind == "embedding" and models["easynegative"].license == "cc0-1.0"
    styled = [(v, a) for v, a in rows if v.adapters]
    assert len(styled) == 2
    pipe = Pipeline.load(BUNDLED)
    for variant, asset in styled:
        infotext, xmp = read_image_metadata(store.get(asset.storage_key))
        prompt, negative, params = parse_infotext(infotext)
        assert "<lora:acme-style:0.8>" in prompt and "easynegative" in negative
        lora_sha = models["acme-style"].sha256
        emb_sha = models["easynegative"].sha256
        assert params["Lora hashes"] == f"acme-style: {lora_sha[:12]}"
        assert params["TI hashes"] == f"easynegative: {emb_sha[:12]}"
        assert json.loads(params["Hashes"]) == {"model": models["adforge-demo"].short_hash, "lora:acme-style": lora_sha[:10],
                                                "embed:easynegative": emb_sha[:10]}
        assert "acme-style: apache-2.0" in params["Adapter licenses"]
        assert xmp is not None and "acme-style" in xmp
        # The stored pixels are exactly what the engine renders with those two files.
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, seed=variant.seed, width=variant.gen_width, height=variant.gen_height,
            steps=2, sampler=variant.sampler, cfg_scale=variant.cfg_scale,
            loras=(LoraUse(AdapterFile("acme-style", str(adapter_dirs[0] / "acme-style.safetensors"), lora_sha), 0.8, 0.8),),
            embeddings=(AdapterFile("easynegative", str(adapter_dirs[1] / "easynegative.pt"), emb_sha),))
        expected = cover_resize(pipe.generate([request])[0].image, variant.out_width, variant.out_height)
        with Image.open(io.BytesIO(store.get(asset.storage_key))) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
        # ... and differ from the image without them.
        plain = cover_resize(pipe.generate([GenerationRequest(prompt=prompt.replace(" <lora:acme-style:0.8>", ""),
                                                              negative_prompt=negative.replace(", easynegative", ""),
                                                              seed=variant.seed, width=variant.gen_width,
                                                              height=variant.gen_height, steps=2, sampler=variant.sampler,
                                                              cfg_scale=variant.cfg_scale)])[0].image,
                             variant.out_width, variant.out_height)
        assert not np.array_equal(np.asarray(plain), np.asarray(expected))
    # The plain row rendered after the styled batches, on the same warm pipeline: the LoRA was taken out exactly.
    (variant, asset), = [(v, a) for v, a in rows if not v.adapters]
    prompt, negative, params = parse_infotext(read_image_metadata(store.get(asset.storage_key))[0])
    assert "Lora hashes" not in params and "Hashes" not in params
    base = Pipeline.load(BUNDLED).generate([GenerationRequest(
        prompt=prompt, negative_prompt=negative, seed=variant.seed, width=variant.gen_width, height=variant.gen_height,
        steps=2, sampler=variant.sampler, cfg_scale=variant.cfg_scale)])[0].image
    with Image.open(io.BytesIO(store.get(asset.storage_key))) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(cover_resize(base, variant.out_width, variant.out_height)))
    db.dispose()

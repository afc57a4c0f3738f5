"""Upscale chains in campaign runs: a channel's chain through the real Prefect flow (chain, upscaler, hashes and
licences in the database and the image infotext), licence refusals for upscalers, planning problems, the
default chain keeping identities, and one asset's failed upscale not stopping the others."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from engine.upscale.chain import parse_chain
from engine.upscale.networks import clear_upscalers, inspect_upscaler
from engine.upscale.random_models import random_compact, random_esrgan, write_upscaler
from flows.brief import read_brief
from flows.campaign import campaign_run, make_plan
from cli.app import app as cli_app
from flows.model_registry import ensure_model, register_model
from flows.planning import cover_description
from flows.recording import start_run, sync_plan
from flows.rendering import load_jobs, render_variants
from flows.settings import load_settings
from flows.channels import load_channels
from storage.assets import open_store
from storage.database import Database, open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.variants import VariantSpec
from storage.schema import Asset, ModelRecord, Variant, VariantUpscaler

from tests.helpers import ROOT, templates_with, write_brief

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "license"]
HQ_CHAIN = "hires(scale=2, denoise=0.4, steps=2) -> model({file}) -> fit(192x320)"


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small random upscalers: an ESRGAN x4 and a Compact x2 with no licence anywhere, and a Compact that declares
    CC BY-NC-SA (non-commercial) in its metadata."""
    root = tmp_path_factory.mktemp("campaign-upscalers")
    files = {
        "esrgan": write_upscaler(random_esrgan(num_filters=8, num_blocks=1, scale=4, seed=7), root / "4x-esrgan-tiny.safetensors"),
        "compact": write_upscaler(random_compact(scale=2, seed=8), root / "2x-compact-tiny.pth"),
        "nc": write_upscaler(random_compact(scale=2, seed=9), root / "2x-nc.safetensors",
                             {"modelspec.license": "CC-BY-NC-SA-4.0", "modelspec.title": "nc-upscaler"}),
    }
    yield files
    clear_upscalers()


def plan(brief: Path, templates: Path, model: Path, db: Database | None):
    settings = load_settings({"templates_dir": str(templates), "model": str(model), "steps": 2}, env={})
    parsed = read_brief(brief, known_channels=set(load_channels(templates / "channels.yaml")))
    return make_plan(parsed, settings, db, strict=False), settings


# ------------------------------------------------------------------------------------------------ the real flow


def test_campaign_run_records_chain_upscaler_and_licence(tmp_path: Path, campaign_model: Path, sqlite_db_url: str,
                                                         upscalers: dict[str, Path], campaign_caches) -> None:
    esrgan = upscalers["esrgan"]
    info = inspect_upscaler(esrgan)
    db = open_database(sqlite_db_url)
    register_model(db, esrgan, "apache-2.0", name="4x-esrgan-tiny")
    db.dispose()
    templates = templates_with(tmp_path, {"story_hq": (192, 320, HQ_CHAIN.format(file=esrgan))})
    brief = write_brief(tmp_path / "brief.csv", ['c1,r1,a red circle,"story_hq, instagram_square",2,commercial'], HEADER)
    overrides = {"db_url": sqlite_db_url, "store_url": str(tmp_path / "assets"), "model": str(campaign_model),
                 "steps": 2, "batch_size": 4, "templates_dir": str(templates)}
    summary = campaign_run(str(brief), overrides=overrides)
    assert summary["status"] == "completed", summary
    assert summary["counts"]["rendered"] == 4

    chain = parse_chain(HQ_CHAIN.format(file=esrgan))
    pinned = chain.pinned({1: info.sha256}).canonical()
    db = open_database(sqlite_db_url)
    store = open_store(str(tmp_path / "assets"))
    with db.session() as s:
        hq = s.scalars(select(Variant).where(Variant.channel == "story_hq")).all()
        square = s.scalars(select(Variant).where(Variant.channel == "instagram_square")).all()
        assert len(hq) == 2 and len(square) == 2
        assert {v.postprocess for v in hq} == {pinned}
        assert {v.postprocess for v in square} == {"cover-lanczos(1080x1080)"}
        for v in hq:
            [link] = s.scalars(select(VariantUpscaler).where(VariantUpscaler.variant_id == v.id)).all()
            model = s.get(ModelRecord, link.model_id)
            assert link.position == 1
            assert (model.kind, model.family, model.sha256, model.license, model.commercial_use) == (
                "upscaler", "esrgan", info.sha256, "apache-2.0", True)
        assert not s.scalars(select(VariantUpscaler).where(VariantUpscaler.variant_id.in_([v.id for v in square]))).all()
        assets = {a.variant_id: a for a in s.scalars(select(Asset))}
        for v in hq:
            asset = assets[v.id]
            data = store.get(asset.storage_key)
            with Image.open(io.BytesIO(data)) as im:
                assert im.size == (192, 320)
            infotext, xmp = read_image_metadata(data)
            assert infotext == asset.infotext
            _, _, p = parse_infotext(infotext)
            assert p["Postprocess"] == chain.canonical(pins=False)
            assert p["Upscaler"] == f"4x-esrgan-tiny ({info.short_hash})" and p["Upscaler license"] == "apache-2.0"
            assert (p["Hires upscale"], p["Hires steps"], p["Denoising strength"], p["Hires upscaler"]) == ("2", "2", "0.4", "Latent")
            assert p["Size"] == f"{v.gen_width}x{v.gen_height}" == "48x80" and p["Output size"] == "192x320"
            assert xmp is not None and info.sha256 in xmp  # the pinned chain travels in the XMP packet too
        for v in square:
            _, _, p = parse_infotext(assets[v.id].infotext)
            assert p["Postprocess"] == "cover-lanczos(1080x1080)" and "Upscaler" not in p and "Hires upscale" not in p
    db.dispose()

    again = campaign_run(str(brief), overrides=overrides)
    assert again["counts"]["rendered"] == 0 and again["counts"]["skipped"] == 4  # the chain's identity is stable


# ------------------------------------------------------------------------------------------------ planning


def test_non_commercial_upscaler_is_refused_for_commercial_rows(tmp_path: Path, campaign_model: Path, upscalers: dict[str, Path],
                                                                db: Database) -> None:
    nc = upscalers["nc"]
    templates = templates_with(tmp_path, {"story_nc": (192, 320, HQ_CHAIN.format(file=nc))})
    brief = write_brief(tmp_path / "brief.csv", ["c1,shop,a red circle,story_nc,1,commercial",
                                                 "c1,study,a blue circle,story_nc,1,any"], HEADER)
    the_plan, _ = plan(brief, templates, campaign_model, db)
    assert [v.row.row_id for v in the_plan.variants] == ["study"]
    [problem] = the_plan.problems
    sha = inspect_upscaler(nc).sha256
    assert (problem.file, problem.line, problem.column) == (str(brief), 2, "license")
    assert str(problem) == (
        f"{brief}:2: column 'license': channel 'story_nc' upscale chain ({templates / 'channels.yaml'}: key "
        f"'channels.story_nc.upscale'): upscaler 'nc-upscaler' ({sha[:10]}) is licensed 'cc-by-nc-sa-4.0', which forbids "
        f"commercial use, and the row needs commercial use (set its license column to 'any' for non-commercial work)")
    [(position, info)] = the_plan.variants[0].upscalers
    assert (position, info.kind, info.license, info.commercial_use) == (1, "upscaler", "cc-by-nc-sa-4.0", False)


def test_unregistered_upscaler_without_licence_is_unknown_until_registered(tmp_path: Path, campaign_model: Path,
                                                                           upscalers: dict[str, Path], sqlite_db_url: str) -> None:
    """A .pth upscaler declares nothing: commercial rows refuse it, with the command to register it; after
    `adforge models add FILE --license ...` the same brief plans."""
    pth = upscalers["compact"]
    templates = templates_with(tmp_path, {"story_x2": (96, 160, f"model({pth}) -> fit(96x160)")})
    brief = write_brief(tmp_path / "brief.csv", ["c1,shop,a red circle,story_x2,1,", "c1,plain,a red circle,instagram_square,1,"], HEADER)
    db = open_database(sqlite_db_url)
    try:
        before, _ = plan(brief, templates, campaign_model, db)
        assert [v.row.row_id for v in before.variants] == ["plain"]
        [problem] = before.problems
        assert problem.column == "license" and "upscaler '2x-compact-tiny'" in problem.message
        assert "has no licence on record" in problem.message and f"adforge models add {pth} --license <id>" in problem.message

        result = CliRunner().invoke(cli_app, ["models", "add", str(pth), "--license", "apache-2.0", "--db", sqlite_db_url])
        assert result.exit_code == 0, result.output
        assert "registered upscaler 2x-compact-tiny" in result.output and "realesrgan-compact" in result.output
        assert "licence apache-2.0, commercial use allowed" in result.output

        after, _ = plan(brief, templates, campaign_model, db)
        assert after.problems == [] and [v.row.row_id for v in after.variants] == ["shop", "plain"]
        assert after.variants[0].upscalers[0][1].license == "apache-2.0"
    finally:
        db.dispose()


def test_planning_problems_name_the_channel_key(tmp_path: Path, campaign_model: Path, upscalers: dict[str, Path]) -> None:
    """A missing file, a checkpoint where an upscaler belongs, a pin the file does not match, an absurd size: each
    skips its row with a problem saying where to fix it; the other rows plan."""
    missing = tmp_path / "nowhere" / "4x.pth"
    wrong_pin = "f" * 64
    templates = templates_with(tmp_path, {
        "ch_missing": (64, 64, f"model({missing}) -> fit(64x64)"),
        "ch_checkpoint": (64, 64, f"model({campaign_model}) -> fit(64x64)"),
        "ch_pin": (64, 64, f"model({upscalers['nc']}, sha256={wrong_pin}) -> fit(64x64)"),
        "ch_huge": (64, 64, "model({f}) -> model({f}) -> model({f}) -> model({f}) -> model({f}) -> fit(64x64)".format(f=upscalers["esrgan"])),
    })
    brief = write_brief(tmp_path / "brief.csv", ["c1,a,x,ch_missing,1,any", "c1,b,x,ch_checkpoint,1,any", "c1,c,x,ch_pin,1,any",
                                                 "c1,d,x,ch_huge,1,any", "c1,e,x,instagram_square,1,any"], HEADER)
    the_plan, _ = plan(brief, templates, campaign_model, None)
    problems = {p.line: p for p in the_plan.problems}
    key = f"{templates / 'channels.yaml'}: key 'channels.{{}}.upscale'"
    assert problems[2].column == "channels" and problems[2].message.startswith(key.format("ch_missing"))
    assert f"upscaler file '{missing}' cannot be used" in problems[2].message and "no such model file" in problems[2].message
    assert problems[3].message == f"{key.format('ch_checkpoint')}: '{campaign_model}' is a sd1 model, not an upscaler"
    assert f"pins '{upscalers['nc']}' to sha256 {wrong_pin}, but the file has" in problems[4].message
    assert "more than 32768 px a side" in problems[5].message
    assert [v.row.row_id for v in the_plan.variants] == ["e"]


def test_upscaler_as_a_row_model_is_refused(tmp_path: Path, campaign_model: Path, upscalers: dict[str, Path]) -> None:
    # Both files in one folder, the default model's, where a row's model may be (flows.planning.model_folders).
    (tmp_path / "default.safetensors").symlink_to(campaign_model)
    upscaler = shutil.copy(upscalers["esrgan"], tmp_path / upscalers["esrgan"].name)
    brief = tmp_path / "brief.csv"
    brief.write_text("campaign,row_id,subject,channels,variants,license,model\n"
                     f"c1,a,x,instagram_square,1,any,{upscaler}\nc1,b,x,instagram_square,1,any,\n")
    the_plan, _ = plan(brief, ROOT / "templates", tmp_path / "default.safetensors", None)
    [problem] = the_plan.problems
    assert problem.column == "model" and "is an upscaler, not a checkpoint" in problem.message


def test_default_and_explicit_fit_keep_the_old_identity(tmp_path: Path, campaign_model: Path) -> None:
    """Writing `upscale: fit(WxH)` is the default spelled out: same post-processing text, same identities as a
    channel without the key (so existing assets are found again)."""
    templates = templates_with(tmp_path, {"plain": (200, 120, None), "spelled": (200, 120, "fit(200x120)")})
    brief = write_brief(tmp_path / "brief.csv", ["c1,a,x,\"plain, spelled\",2,any"], HEADER)
    the_plan, _ = plan(brief, templates, campaign_model, None)
    by_channel: dict[str, list] = {}
    for v in the_plan.variants:
        by_channel.setdefault(v.channel.name, []).append(v)
    assert {v.spec.postprocess for v in the_plan.variants} == {cover_description(by_channel["plain"][0].channel)} == {"cover-lanczos(200x120)"}
    for p, sp in zip(by_channel["plain"], by_channel["spelled"]):
        assert p.upscalers == sp.upscalers == ()
        expected = VariantSpec(
            campaign=p.row.campaign, row_key=p.row.row_id, channel="spelled", template=sp.prompt.template_name,
            prompt=sp.prompt.prompt, negative_prompt=sp.prompt.negative_prompt, variant_index=sp.spec.variant_index,
            seed=sp.spec.seed, model_sha256=sp.model.sha256, sampler=sp.spec.sampler, steps=sp.spec.steps,
            cfg_scale=sp.spec.cfg_scale, clip_skip=sp.spec.clip_skip, gen_width=sp.spec.gen_width,
            gen_height=sp.spec.gen_height, out_width=200, out_height=120, out_format="jpeg", out_max_kb=8192,
            postprocess="cover-lanczos(200x120)").identity
        assert sp.identity == expected


# ------------------------------------------------------------------------------------------------ failures stay local


def test_one_failed_upscale_fails_only_its_variants(tmp_path: Path, campaign_model: Path, upscalers: dict[str, Path],
                                                    sqlite_db_url: str) -> None:
    """The worker cannot find one chain's upscaler file (deleted after planning): those variants fail with the
    file named, the other chain's and the default channel's variants are stored; progress reports each upscale."""
    doomed = tmp_path / "doomed-x2.safetensors"
    shutil.copy(upscalers["nc"], doomed)
    templates = templates_with(tmp_path, {"ok_chain": (96, 160, f"model({upscalers['compact']}) -> fit(96x160)"),
                                          "bad_chain": (96, 160, f"hires(scale=2, steps=2, upscaler={doomed}) -> fit(96x160)")})
    brief = write_brief(tmp_path / "brief.csv", ['c1,r1,a red circle,"ok_chain, bad_chain, instagram_square",2,any'], HEADER)
    db = open_database(sqlite_db_url)
    try:
        ensure_model(db, campaign_model)  # what plan_run does for a checkpoint seen for the first time
        the_plan, settings = plan(brief, templates, campaign_model, db)
        assert the_plan.problems == []
        run_id = start_run(db, str(brief), the_plan.brief, settings, None)
        states = sync_plan(db, the_plan, run_id)
        doomed.unlink()
        clear_upscalers()
        events: list[tuple[str, int]] = []
        counts = render_variants([s.id for s in states.values()], db=db, store=open_store(str(tmp_path / "assets")),
                                 run_id=run_id, device="cpu", batch_size=8, on_event=lambda e, n: events.append((e, n)))
        assert (counts.rendered, counts.failed) == (4, 2)
        with db.session() as s:
            status = {(v.channel, v.variant_index): (v.status, v.error) for v in s.scalars(select(Variant))}
        assert {k: st for k, (st, _) in status.items()} == {
            ("ok_chain", 0): "done", ("ok_chain", 1): "done", ("instagram_square", 0): "done", ("instagram_square", 1): "done",
            ("bad_chain", 0): "failed", ("bad_chain", 1): "failed"}
        assert "hires fix failed" in status[("bad_chain", 0)][1] and "doomed-x2.safetensors" in status[("bad_chain", 0)][1]
        assert events.count(("upscaled", 1)) == 2 and ("failed", 2) in events and ("rendered", 4) in events
    finally:
        db.dispose()


def test_registered_upscaler_found_elsewhere_is_loaded_from_there(tmp_path: Path, campaign_model: Path,
                                                                   upscalers: dict[str, Path], sqlite_db_url: str) -> None:
    """Registered at one path, the file later lives at another (same bytes, same model): the plan records where
    the chain found it, and rendering loads it from there, with the registered licence."""
    old, new = tmp_path / "old" / "x2.pth", tmp_path / "new" / "x2.pth"
    old.parent.mkdir()
    new.parent.mkdir()
    shutil.copy(upscalers["compact"], old)
    db = open_database(sqlite_db_url)
    try:
        ensure_model(db, campaign_model)
        register_model(db, old, "mit")
        shutil.move(old, new)
        templates = templates_with(tmp_path, {"moved": (96, 160, f"model({new}) -> fit(96x160)")})
        the_plan, settings = plan(write_brief(tmp_path / "brief.csv", ["c1,r1,x,moved,1,"], HEADER), templates, campaign_model, db)
        assert the_plan.problems == []
        states = sync_plan(db, the_plan, start_run(db, "brief.csv", the_plan.brief, settings, None))
        [job] = load_jobs(db, [st.id for st in states.values()])
        [ref] = job.upscalers
        assert (ref.path, ref.license) == (str(new.resolve()), "mit")
    finally:
        db.dispose()

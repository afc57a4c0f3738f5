"""End-to-end campaign runs through the real Prefect flow: brief -> variants -> engine -> store -> database.

One Prefect API server serves the whole session (``prefect_harness``); the engine is a tiny random SD1
checkpoint with a 64 px native size, so every image is real output of our pipeline, only small and noisy.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from flows.brief import BriefError
from flows.campaign import campaign_run
from flows.model_registry import register_model
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import TRAINED_ALGORITHMIC_MEDIA, parse_infotext, read_image_metadata
from storage.schema import Asset, AuditEntry, BriefRowRecord, ModelRecord, Run, Variant

from tests.helpers import EXAMPLE_BRIEFS, ROOT

EXAMPLE_CSV = EXAMPLE_BRIEFS / "spring-launch.csv"
EXAMPLE_XLSX = EXAMPLE_BRIEFS / "spring-launch.xlsx"
EXAMPLE_IMAGES = 4 * 3 + 3 * 2 + 2 * 1 + 2 * 2  # rows x channels x variants of the example brief


pytestmark = pytest.mark.usefixtures("campaign_caches")


def _run(brief: Path, db_url: str, store_url: str, model: Path, **kw) -> dict:
    overrides = {"db_url": db_url, "store_url": store_url, "model": str(model), "steps": 2, "batch_size": 4}
    overrides.update(kw.pop("overrides", {}))
    return campaign_run(str(brief), overrides=overrides, **kw)


def _check_assets(db_url: str, store_url: str, expected: int) -> None:
    """Every variant done, one asset each, the file in the store matches its record and carries its metadata."""
    db = open_database(db_url)
    store = open_store(store_url)
    with db.session() as s:
        assert s.scalar(select(func.count(Variant.id))) == expected
        assert s.scalar(select(func.count(Variant.id)).where(Variant.status != "done")) == 0
        assets = s.execute(select(Asset, Variant).join(Variant, Asset.variant_id == Variant.id)).all()
    assert len(assets) == expected
    assert len({a.storage_key for a, _ in assets}) == expected
    # each delivered file, and the picture without its brand overlay (the example brief names a brand kit)
    assert sorted(store.list()) == sorted([a.storage_key for a, _ in assets] + [a.clean_key for a, _ in assets if a.clean_key])
    for asset, variant in assets:
        data = store.get(asset.storage_key)
        assert len(data) == asset.size_bytes and len(data) <= variant.out_max_kb * 1024
        assert hashlib.sha256(data).hexdigest() == asset.sha256
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (variant.out_width, variant.out_height)
            assert im.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[variant.out_format]
        infotext, xmp = read_image_metadata(data)
        assert infotext == asset.infotext
        prompt, negative, params = parse_infotext(infotext)
        assert params["Seed"] == str(variant.seed)
        assert params["Steps"] == str(variant.steps)
        assert params["Size"] == f"{variant.gen_width}x{variant.gen_height}"
        assert params["Output size"] == f"{variant.out_width}x{variant.out_height}"
        assert xmp is not None and TRAINED_ALGORITHMIC_MEDIA in xmp
    db.dispose()


def test_example_brief_local_sqlite_then_rerun_renders_nothing(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    store_url = str(tmp_path / "assets")
    summary = _run(EXAMPLE_CSV, sqlite_db_url, store_url, campaign_model)
    assert summary["status"] == "completed", summary
    assert summary["counts"]["planned"] == EXAMPLE_IMAGES
    assert summary["counts"]["rendered"] == EXAMPLE_IMAGES
    assert summary["flow_run_id"]
    _check_assets(sqlite_db_url, store_url, EXAMPLE_IMAGES)

    files_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "assets").rglob("*") if p.is_file()}
    again = _run(EXAMPLE_CSV, sqlite_db_url, store_url, campaign_model)
    assert again["counts"]["rendered"] == 0 and again["counts"]["skipped"] == EXAMPLE_IMAGES
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "assets").rglob("*") if p.is_file()} == files_before
    _check_assets(sqlite_db_url, store_url, EXAMPLE_IMAGES)

    db = open_database(sqlite_db_url)
    with db.session() as s:
        runs = s.scalars(select(Run).order_by(Run.id)).all()
        assert [r.status for r in runs] == ["completed", "completed"]
        assert runs[0].flow_run_id == summary["flow_run_id"]
        assert runs[0].settings["model"] == str(campaign_model)
        model = s.scalars(select(ModelRecord)).one()
        assert (model.license, model.commercial_use, model.license_source) == ("apache-2.0", True, "file-metadata")
        actions = Counter(s.scalars(select(AuditEntry.action)))
        assert actions["asset.stored"] == EXAMPLE_IMAGES and actions["run.completed"] == 2
        row = s.scalars(select(BriefRowRecord).where(BriefRowRecord.row_key == "hero-01")).one()
        assert row.data["extra"] == {"tagline": "Fresh for spring"}
    db.dispose()


def test_xlsx_brief_on_s3_and_postgresql(tmp_path: Path, campaign_model: Path, postgres_url: str, s3_endpoint: str,
                                         s3_bucket: str) -> None:
    store_url = f"s3://{s3_bucket}/campaigns?endpoint_url={s3_endpoint}"
    summary = _run(EXAMPLE_XLSX, postgres_url, store_url, campaign_model)
    assert summary["status"] == "completed", summary
    assert summary["counts"]["rendered"] == EXAMPLE_IMAGES
    _check_assets(postgres_url, store_url, EXAMPLE_IMAGES)
    db = open_database(postgres_url)
    with db.session() as s:
        urls = s.scalars(select(Asset.store_url)).all()
    assert all(u.startswith(f"s3://{s3_bucket}/campaigns/spring-launch-2025/") for u in urls)
    db.dispose()


def test_same_rows_in_csv_and_xlsx_are_the_same_variants(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    """Identity depends on what is rendered, not on the file it came from: the XLSX copy of a rendered CSV
    brief renders nothing new."""
    store_url = str(tmp_path / "assets")
    _run(EXAMPLE_CSV, sqlite_db_url, store_url, campaign_model, overrides={"steps": 1})
    again = _run(EXAMPLE_XLSX, sqlite_db_url, store_url, campaign_model, overrides={"steps": 1})
    assert again["counts"]["rendered"] == 0 and again["counts"]["skipped"] == EXAMPLE_IMAGES


BAD_BRIEF = """campaign,row_id,subject,channels,variants
c1,r1,a red circle,instagram_square,2
c1,r2,a blue square,tiktok_vertical,2
c1,r3,a green star,banner,two
"""


def test_bad_brief_strict_is_rejected_and_writes_nothing(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    brief = tmp_path / "bad.csv"
    brief.write_text(BAD_BRIEF)
    store_url = str(tmp_path / "assets")
    with pytest.raises(BriefError) as err:
        _run(brief, sqlite_db_url, store_url, campaign_model, strict=True)
    text = str(err.value)
    assert f"{brief}:3: column 'channels': unknown channel 'tiktok_vertical'" in text
    assert f"{brief}:4: column 'variants':" in text and "'two'" in text
    assert not (tmp_path / "assets").exists() or not any((tmp_path / "assets").rglob("*.*"))
    db = open_database(sqlite_db_url)
    with db.session() as s:
        assert s.scalar(select(func.count(Run.id))) == 0
        assert s.scalar(select(func.count(Variant.id))) == 0
        assert s.scalar(select(func.count(AuditEntry.id))) == 0
    db.dispose()


def test_bad_rows_are_skipped_and_reported_by_default(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    brief = tmp_path / "bad.csv"
    brief.write_text(BAD_BRIEF)
    summary = _run(brief, sqlite_db_url, str(tmp_path / "assets"), campaign_model)
    assert summary["counts"]["rendered"] == 2
    assert len(summary["problems"]) == 2
    assert any("line 3" in p or ":3:" in p for p in summary["problems"])


def test_commercial_row_refuses_non_commercial_model(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    model = tmp_path / "nc-model.safetensors"
    shutil.copy(campaign_model, model)
    db = open_database(sqlite_db_url)
    register_model(db, model, "cc-by-nc-sa-4.0")
    db.dispose()
    brief = tmp_path / "brief.csv"
    brief.write_text("campaign,row_id,subject,channels,variants,license\n"
                     "c1,shop,a red circle,instagram_square,1,commercial\n"
                     "c1,study,a blue circle,instagram_square,1,any\n")
    summary = _run(brief, sqlite_db_url, str(tmp_path / "assets"), model)
    assert summary["counts"]["rendered"] == 1
    [problem] = summary["problems"]
    assert f"{brief}:2: column 'license':" in problem
    assert "cc-by-nc-sa-4.0" in problem and "forbids commercial use" in problem
    with pytest.raises(BriefError, match="forbids commercial use"):
        _run(brief, sqlite_db_url, str(tmp_path / "assets"), model, strict=True)


def test_one_failing_asset_does_not_stop_the_run(tmp_path: Path, campaign_model: Path, sqlite_db_url: str) -> None:
    """A channel whose PNG cannot fit its size cap fails its variants; the others are stored, the run completes."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    with open(templates / "channels.yaml", "a") as f:
        f.write("  impossible_png:\n    width: 512\n    height: 512\n    format: png\n    max_kb: 1\n"
                "    description: cannot be met\n")
    brief = tmp_path / "brief.csv"
    brief.write_text("campaign,row_id,subject,channels,variants\nc1,r1,a red circle,\"instagram_square, impossible_png\",2\n")
    summary = _run(brief, sqlite_db_url, str(tmp_path / "assets"), campaign_model, overrides={"templates_dir": str(templates)})
    assert summary["status"] == "completed_with_failures"
    assert summary["counts"]["rendered"] == 2 and summary["counts"]["failed"] == 2
    db = open_database(sqlite_db_url)
    with db.session() as s:
        failed = s.scalars(select(Variant).where(Variant.status == "failed")).all()
        assert {v.channel for v in failed} == {"impossible_png"}
        assert all("exceeds the channel's cap of 1 KiB" in (v.error or "") for v in failed)
    db.dispose()


RESUME_BRIEF = "campaign,row_id,subject,channels,variants\n" + "".join(
    f"resume,row-{i},a {c} circle,\"instagram_square, banner\",3\n" for i, c in enumerate(("red", "blue", "green", "pink"))
)


def test_killed_run_resumes_without_duplicates(tmp_path: Path, campaign_model: Path, sqlite_db_url: str, prefect_harness: str) -> None:
    """kill -9 a real `adforge run` mid-way; the re-run completes the rest; nothing is duplicated."""
    brief = tmp_path / "resume.csv"
    brief.write_text(RESUME_BRIEF)
    planned = 4 * 2 * 3
    store_dir = tmp_path / "assets"
    env = dict(os.environ, PREFECT_API_URL=prefect_harness, ADFORGE_DB_URL=sqlite_db_url, ADFORGE_STORE_URL=str(store_dir),
               ADFORGE_MODEL=str(campaign_model))
    cmd = [sys.executable, "-m", "cli", "run", str(brief), "--steps", "3", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = open_database(sqlite_db_url)
    deadline = time.monotonic() + 180
    done = 0
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{proc.stdout.read().decode()}")
            with db.session() as s:
                done = s.scalar(select(func.count(Asset.id))) or 0
            if done >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no asset recorded within 180 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with db.session() as s:
        killed_at = s.scalar(select(func.count(Asset.id)))
    assert 3 <= killed_at < planned

    summary = campaign_run(str(brief), overrides={"db_url": sqlite_db_url, "store_url": str(store_dir),
                                                   "model": str(campaign_model), "steps": 3, "batch_size": 1})
    assert summary["status"] == "completed"
    assert summary["counts"]["skipped"] >= killed_at
    assert summary["counts"]["rendered"] + summary["counts"]["skipped"] == planned
    _check_assets(sqlite_db_url, str(store_dir), planned)
    assert not [p for p in store_dir.rglob("*") if p.is_file() and p.name.startswith(".")], "temporary files left behind"
    with db.session() as s:
        runs = s.scalars(select(Run).order_by(Run.id)).all()
        # The killed run never reported back; the next run on this host saw its process gone and said so.
        assert [r.status for r in runs] == ["crashed", "completed"]
        assert s.scalar(select(func.count(AuditEntry.id)).where(AuditEntry.action == "run.crashed")) == 1
        per_variant = Counter(s.scalars(select(Asset.variant_id)))
        assert max(per_variant.values()) == 1
    db.dispose()

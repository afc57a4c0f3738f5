"""``adforge verify`` on a delivered file of a real campaign run, on a copy stripped of its metadata (the watermark
still names the asset), on an unrelated picture (nothing found, exit code 1), and on a picture with Stable
Diffusion's own watermark (found as a foreign mark)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from cli.app import app
from flows.campaign import close_resources
from storage.database import open_database, sqlite_url
from storage.image_metadata import TRAINED_ALGORITHMIC_MEDIA
from storage.schema import Asset
from storage.watermark_payload import MAGIC

BRIEF = "campaign,row_id,subject,channels,variants,seed\nverify-me,hero-01,a red bicycle,banner,1,7\n"


@pytest.fixture
def delivered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: str, campaign_model: Path):
    """One banner (1200x628 JPEG) of a real run, in an empty folder with the default ./adforge-data locations."""
    monkeypatch.chdir(tmp_path)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_MODEL", "ADFORGE_CONFIG", "ADFORGE_WATERMARK"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "brief.csv").write_text(BRIEF)
    result = CliRunner().invoke(app, ["run", "brief.csv", "--model", str(campaign_model), "--steps", "1"])
    assert result.exit_code == 0, result.output
    close_resources()
    files = list((tmp_path / "adforge-data" / "assets").rglob("*.jpg"))
    assert len(files) == 1
    yield files[0]
    close_resources()


def _verify(*files: Path, json_out: bool = False):
    result = CliRunner().invoke(app, ["verify", *map(str, files), *(["--json"] if json_out else [])])
    return result, re.sub(r"\s+", " ", result.output)


def test_verify_finds_everything_in_a_delivered_file_and_the_mark_in_a_stripped_copy(delivered: Path, tmp_path: Path) -> None:
    db = open_database(sqlite_url(tmp_path / "adforge-data" / "adforge.db"))
    with db.session() as s:
        asset = s.scalars(select(Asset)).one()
        payload, asset_id, sha = asset.watermark, asset.id, asset.sha256
    db.dispose()
    assert payload is not None and len(payload) == 16 and payload.startswith(f"{MAGIC:02x}")

    result, out = _verify(delivered)
    assert result.exit_code == 0, result.output
    assert f"adforge asset id {payload}" in out
    assert "Seed: 7" in out and TRAINED_ALGORITHMIC_MEDIA in out
    assert f"asset {asset_id} (by watermark, the delivered file unchanged)" in out and "a red bicycle" in out

    # The pixels alone, re-saved as PNG without any metadata: the watermark still leads to the asset.
    stripped = tmp_path / "stripped.png"
    Image.open(delivered).convert("RGB").save(stripped)
    unrelated = tmp_path / "unrelated.png"
    rng = np.random.default_rng(5)
    smooth = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).resize((600, 400), Image.BICUBIC)
    smooth.save(unrelated)

    result, out = _verify(stripped, json_out=True)
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["findings"] == ["watermark", "database"]
    assert report["watermark"]["kind"] == "adforge" and report["watermark"]["payload"] == payload
    assert report["watermark"]["confidence"] >= report["watermark"]["threshold"]
    assert report["infotext"] is None and report["digital_source_type"] is None and report["c2pa"] is None
    assert report["asset"]["asset_id"] == asset_id and report["asset"]["matched_by"] == "watermark"
    assert report["asset"]["identical_file"] is False and report["sha256"] != sha

    # Cropped by 10 % from the top-left corner and re-encoded: the decoder searches the tile grid.
    cropped = tmp_path / "cropped.jpg"
    with Image.open(delivered) as im:
        im.crop((120, 62, 1200, 628)).save(cropped, quality=90)
    result, out = _verify(cropped)
    assert result.exit_code == 0, result.output
    assert f"adforge asset id {payload}" in out and "searching the tile grid (a crop)" in out
    assert f"asset {asset_id} (by watermark)" in out

    result, out = _verify(unrelated)
    assert result.exit_code == 1, result.output
    assert "nothing found" in out and "watermark none (best reading" in out

    # Several files: one with nothing found makes the exit code 1; a missing file is a bad argument (2, one line).
    result, _ = _verify(delivered, unrelated)
    assert result.exit_code == 1
    result, out = _verify(delivered, tmp_path / "missing.jpg")
    assert result.exit_code == 2 and "missing.jpg" in out and len(result.output.strip().splitlines()) == 1


def test_verify_reads_a_custom_payload_only_when_it_is_this_installations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.watermark import embed
    from storage.watermark_payload import custom_payload

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADFORGE_DB_URL", raising=False)
    rng = np.random.default_rng(9)
    picture = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((512, 384), Image.BICUBIC)
    marked = tmp_path / "acme.png"
    buf = io.BytesIO()
    embed(picture, custom_payload("ACME-7")).save(buf, format="PNG")
    marked.write_bytes(buf.getvalue())

    monkeypatch.setenv("ADFORGE_WATERMARK", "text:ACME-7")
    result, out = _verify(marked)
    assert result.exit_code == 0, result.output
    assert "custom payload 'ACME-7'" in out and "no database at" in out
    assert not (tmp_path / "adforge-data").exists()  # verify never creates a database

    monkeypatch.setenv("ADFORGE_WATERMARK", "on")
    result, out = _verify(marked)
    assert result.exit_code == 1 and "watermark none" in out

    monkeypatch.setenv("ADFORGE_WATERMARK", "text:way-too-long")
    result, out = _verify(marked)
    assert result.exit_code == 2 and "'watermark'" in out


def test_verify_reports_stable_diffusions_own_watermark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         service_missing) -> None:
    try:
        from imwatermark import WatermarkEncoder
    except ImportError as exc:
        service_missing(f"invisible-watermark==0.2.0 (pip install --no-deps invisible-watermark==0.2.0; {exc})")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADFORGE_DB_URL", raising=False)
    monkeypatch.delenv("ADFORGE_WATERMARK", raising=False)
    # As Stable Diffusion's reference txt2img script marks its output: the bytes "StableDiffusionV1", dwtDct, BGR.
    rng = np.random.default_rng(4)
    small = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    busy = np.asarray(small.resize((768, 768), Image.BICUBIC))
    busy = np.clip(busy + rng.normal(0, 6, busy.shape), 0, 255).astype(np.uint8)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"StableDiffusionV1")
    marked = tmp_path / "sd.png"
    bgr = encoder.encode(np.ascontiguousarray(busy[..., ::-1]), "dwtDct")
    Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])).save(marked)
    plain = tmp_path / "plain.png"
    Image.fromarray(busy).save(plain)

    result, out = _verify(marked)
    assert result.exit_code == 0, result.output
    assert "found foreign-watermark" in out and "other mark Stable Diffusion v1 reference watermark" in out
    assert "watermark none (best reading" in out  # not an adforge mark
    result, out = _verify(plain, json_out=True)
    assert result.exit_code == 1
    (report,) = json.loads(result.output)
    assert report["foreign_watermarks"] == [] and report["findings"] == []

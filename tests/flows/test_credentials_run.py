"""Content credentials through whole campaign runs: with ``c2pa_cert`` / ``c2pa_key`` set, every delivered file (PNG,
WebP, and a JPEG under a tight size cap, which the manifest counts against) carries a manifest that c2pa-python
validates against the test CA, naming the model and the row's packshot, and ``assets.credentials`` holds its label;
without them nothing is signed and the run summary says so. The settings are checked when they are loaded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from flows.campaign import campaign_run
from flows.credentials_step import OFF
from flows.settings import SettingsError, load_settings
from storage.assets import open_store
from storage.content_credentials import TRAINED_ALGORITHMIC_MEDIA, read_credentials
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, ModelRecord, Variant
from tests.c2pa_test_ca import TestCA
from tests.engine.test_packshot import draw_packshot
from tests.helpers import templates_with_channels, write_brief

pytestmark = pytest.mark.usefixtures("campaign_caches")

# Unsigned, these JPEGs fit at quality 92 (about 16 KiB); the ~5 KiB manifest makes the encoder step down.
CAP_KB = 17
CHANNELS = ("  cc_png:\n    width: 96\n    height: 96\n    format: png\n    max_kb: 8192\n"
            "  cc_webp:\n    width: 128\n    height: 96\n    format: webp\n    max_kb: 8192\n"
            f"  cc_capped:\n    width: 192\n    height: 192\n    format: jpeg\n    max_kb: {CAP_KB}\n")
HEADER = ["campaign", "row_id", "subject", "channels", "variants", "seed", "product_image"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.make(tmp_path_factory.mktemp("ca"))


def _brief(tmp_path: Path) -> Path:
    (tmp_path / "shots").mkdir()
    draw_packshot().save(tmp_path / "shots" / "bottle.png")
    return write_brief(tmp_path / "brief.csv", [
        {"campaign": "cc", "row_id": "plain", "subject": "a red circle", "channels": "cc_png, cc_webp, cc_capped",
         "variants": "1", "seed": "5"},
        {"campaign": "cc", "row_id": "bottle", "subject": "a blue square", "channels": "cc_png, cc_capped",
         "variants": "1", "seed": "9", "product_image": "shots/bottle.png"},
    ], HEADER)


def _overrides(tmp_path: Path, model: Path, **extra) -> dict:
    return {"model": str(model), "templates_dir": str(templates_with_channels(tmp_path, CHANNELS)), "steps": 2,
            "sampler": "Euler", "db_url": f"sqlite:///{tmp_path / 'a.db'}", "store_url": str(tmp_path / "assets"),
            **extra}


def _delivered(overrides: dict) -> list[tuple[Asset, Variant, ModelRecord, bytes]]:
    db, store = open_database(overrides["db_url"]), open_store(overrides["store_url"])
    with db.session() as s:
        rows = s.execute(select(Asset, Variant, ModelRecord).join(Variant, Asset.variant_id == Variant.id)
                         .join(ModelRecord, Variant.model_id == ModelRecord.id)).all()
    out = [(a, v, m, store.get(a.storage_key)) for a, v, m in rows]
    db.dispose()
    return out


def test_every_delivered_file_carries_a_valid_manifest(tmp_path: Path, campaign_model: Path, ca: TestCA) -> None:
    cert, key = ca.issue()
    overrides = _overrides(tmp_path, campaign_model, c2pa_cert=str(cert), c2pa_key=str(key))
    summary = campaign_run(str(_brief(tmp_path)), overrides=overrides)
    assert summary["counts"]["failed"] == 0 and summary["counts"]["rendered"] == 5
    assert summary["credentials"] == "signed by CN=Adforge Test Signer, O=Adforge Test"
    delivered = _delivered(overrides)
    assert {v.out_format for _, v, _, _ in delivered} == {"png", "webp", "jpeg"}
    for asset, variant, model, data in delivered:
        report = read_credentials(data, variant.out_format, ca.root_pem)
        assert report is not None, asset.storage_key
        assert report.valid and report.trusted and report.problems == [], (asset.storage_key, report.problems)
        assert asset.credentials == report.label
        assert report.actions == ["c2pa.created"] and report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
        assert report.model == {"kind": "checkpoint", "name": model.name, "sha256": model.sha256,
                                "license": model.license}
        assert model.sha256 == hashlib.sha256(campaign_model.read_bytes()).hexdigest() and model.license == "apache-2.0"
        assert report.ingredients == (["shots/bottle.png"] if "/bottle/" in asset.storage_key else [])
        assert len(data) <= variant.out_max_kb * 1024  # the cap counts the manifest
        infotext, _ = read_image_metadata(data)
        assert infotext == asset.infotext
    capped = [parse_infotext(a.infotext)[2] for a, v, _, _ in delivered if v.out_format == "jpeg"]
    # the cap made the encoder step its quality down (so this test exercises the cap), and the file still went out
    assert capped and all(int(p["Output quality"]) < 92 for p in capped), capped


def test_without_a_certificate_nothing_is_signed_and_the_summary_says_so(tmp_path: Path, campaign_model: Path) -> None:
    overrides = _overrides(tmp_path, campaign_model)
    summary = campaign_run(str(_brief(tmp_path)), overrides=overrides)
    assert summary["credentials"] == OFF == "off (no c2pa_cert / c2pa_key configured)"
    delivered = _delivered(overrides)
    for asset, variant, _, data in delivered:
        assert asset.credentials is None
        assert read_credentials(data, variant.out_format) is None
    # the capped channel's JPEGs fit at the first quality tried: what made the signed ones step down is the manifest
    assert all(parse_infotext(a.infotext)[2]["Output quality"] == "92" for a, v, _, _ in delivered if v.out_format == "jpeg")


def test_credential_settings_are_checked_when_loaded(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = ca.issue("settings")
    with pytest.raises(SettingsError, match=r"^command line: 'c2pa_cert' is set but 'c2pa_key' is not"):
        load_settings({"c2pa_cert": str(cert)}, env={}, cwd=tmp_path)
    with pytest.raises(SettingsError, match=r"^ADFORGE_C2PA_KEY: 'c2pa_key' is set but 'c2pa_cert' is not"):
        load_settings({}, env={"ADFORGE_C2PA_KEY": str(key)}, cwd=tmp_path)
    # relative to where adforge runs; recorded resolved, so every worker of the run finds the same files
    settings = load_settings({"c2pa_cert": os.path.relpath(cert, tmp_path), "c2pa_key": os.path.relpath(key, tmp_path),
                              "c2pa_trust": os.path.relpath(ca.root_path, tmp_path)}, env={}, cwd=tmp_path)
    assert (settings.c2pa_cert, settings.c2pa_key, settings.c2pa_trust) == (cert.resolve().as_posix(),
                                                                          key.resolve().as_posix(),
                                                                          ca.root_path.resolve().as_posix())
    _, stranger = ca.issue("stranger")
    with pytest.raises(SettingsError) as caught:
        load_settings({"c2pa_cert": str(cert), "c2pa_key": str(stranger)}, env={}, cwd=tmp_path)
    assert str(caught.value).startswith(f"command line: 'c2pa_key': {stranger}: this key does not belong")
    old, old_key = ca.issue("expired", expired=True)
    config = tmp_path / "adforge.toml"
    config.write_text(f'c2pa_cert = "{old}"\nc2pa_key = "{old_key}"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings({}, env={}, cwd=tmp_path)
    assert str(caught.value).startswith(f"{config}: 'c2pa_cert': {old}: certificate CN=Adforge Test Signer expired on")
    config.unlink()
    not_pem = tmp_path / "trust.txt"
    not_pem.write_text("our CA\n")
    with pytest.raises(SettingsError, match="'c2pa_trust': .*trust.txt: not a PEM file of trust anchor certificates"):
        load_settings({"c2pa_trust": str(not_pem)}, env={}, cwd=tmp_path)
    with pytest.raises(SettingsError, match="'c2pa_trust': .*missing.pem: cannot read"):
        load_settings({"c2pa_trust": "missing.pem"}, env={}, cwd=tmp_path)


def test_adforge_run_says_who_signed_or_that_nothing_was(tmp_path: Path, campaign_model: Path, ca: TestCA,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from typer.testing import CliRunner

    from cli.app import app

    cert, key = ca.issue("cli")
    brief = _brief(tmp_path)
    templates = templates_with_channels(tmp_path, CHANNELS)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_MODEL", "ADFORGE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)

    def run(name: str) -> tuple[int, str]:
        # a fresh database and store each time, so that everything renders (and is signed) again
        (tmp_path / "adforge.toml").write_text(f'templates_dir = "{templates}"\ndb_url = "sqlite:///{tmp_path / name}.db"\n'
                                               f'store_url = "{tmp_path / name}"\n')
        result = CliRunner().invoke(app, ["run", str(brief), "--model", str(campaign_model), "--steps", "1"])
        return result.exit_code, re.sub(r"\s+", " ", result.output)

    code, out = run("plain")
    assert code == 0 and "content credentials: off (no c2pa_cert / c2pa_key configured)" in out, out
    assert "watermark: on (each file's asset id, invisible; adforge verify reads it)" in out, out  # the default
    monkeypatch.setenv("ADFORGE_C2PA_CERT", str(cert))
    monkeypatch.setenv("ADFORGE_C2PA_KEY", str(key))
    code, out = run("signed")
    assert code == 0 and "content credentials: signed by CN=Adforge Test Signer, O=Adforge Test" in out, out
    monkeypatch.setenv("ADFORGE_C2PA_KEY", str(ca.issue("cli-other")[1]))
    code, out = run("refused")
    assert code == 2 and "ADFORGE_C2PA_KEY: 'c2pa_key':" in out and "this key does not belong" in out, out

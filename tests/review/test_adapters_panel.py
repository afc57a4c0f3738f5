"""The gallery's detail panel, its JSON and the audit export list a variant's LoRAs and embeddings with their
hashes and licences (a pin whose ``models`` row is gone still shows what the variant recorded)."""

from __future__ import annotations

import html
from pathlib import Path

import pytest

from cli.review import known_samplers
from review.app import create_app
from review.audit_export import audit_export, to_csv
from storage.assets import open_store
from storage.database import open_database
from storage.schema import ModelRecord, Variant
from storage.variants import AdapterPin, adapters_text

from tests.review.world import Browser, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

LORA_SHA, EMB_SHA = "a" * 64, "e" * 64


def test_detail_panel_json_and_audit_export_list_adapters(sqlite_db_url: str, tmp_path: Path) -> None:
    store_url = str(tmp_path / "assets")
    db = open_database(sqlite_db_url)
    world = build_world(db, open_store(store_url), store_url)
    vid = world.variants[("hero-01", "instagram_square")][0]
    pins = adapters_text([AdapterPin("lora", "acme-style", LORA_SHA, 0.8, 0.6), AdapterPin("embedding", "easynegative", EMB_SHA)])
    with db.session() as s:
        s.add(ModelRecord(name="acme-style", path="/loras/acme-style.safetensors", sha256=LORA_SHA, short_hash=LORA_SHA[:10],
                          family="sd1", kind="lora", license="cc-by-nc-4.0", commercial_use=False))
        s.get(Variant, vid).adapters = pins
    app = create_app(sqlite_db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs", samplers=known_samplers())
    try:
        browser = Browser(app, "vic")
        page = html.unescape(browser.get(f"/variants/{vid}").text)
        assert 'id="field-adapters"' in page
        assert "acme-style" in page and "te 0.8 · unet 0.6" in page and "aaaaaaaaaaaa" in page
        assert "cc-by-nc-4.0 (no commercial use)" in page
        assert "easynegative" in page and "licence unknown" in page
        other = world.variants[("hero-01", "instagram_square")][1]
        assert 'id="field-adapters"' not in browser.get(f"/variants/{other}").text
        detail = browser.get(f"/api/variants/{vid}").json()
        lora, emb = detail["adapters"]
        assert (lora["kind"], lora["name"], lora["te"], lora["unet"], lora["license"]) == ("lora", "acme-style", 0.8, 0.6, "cc-by-nc-4.0")
        assert (emb["kind"], emb["name"], emb["sha256"], emb["license"]) == ("embedding", "easynegative", EMB_SHA, None)
    finally:
        app.state.db.dispose()
    export = audit_export(db, "spring-launch")
    by_variant = {a["variant_id"]: a for a in export.assets}
    assert [a["name"] for a in by_variant[vid]["reproduce"]["adapters"]] == ["acme-style", "easynegative"]
    assert by_variant[other]["reproduce"]["adapters"] == []
    assert LORA_SHA in to_csv(export)
    db.dispose()

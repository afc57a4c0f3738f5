"""The gallery shows a packshot variant's product: its outline over the thumbnail (drawn on hover), a flag on any
asset whose delivered product pixels differ from the packshot, and the product and layout in the detail panel."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from sqlalchemy import select

from cli.review import known_samplers
from review.app import create_app
from storage.assets import open_store
from storage.database import open_database
from storage.schema import Asset, Campaign, Variant
from storage.variants import ControlPin, ProductPin, VariantInputs, inputs_text

from tests.review.world import Browser, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

OUTLINE = "M10 10 L50 10 L50 90 L10 90 Z"


def test_gallery_outlines_products_and_flags_changed_ones(sqlite_db_url: str, tmp_path: Path) -> None:
    store_url = str(tmp_path / "assets")
    db = open_database(sqlite_db_url)
    world = build_world(db, open_store(store_url), store_url)
    kept, changed, plain = world.variants[("hero-01", "instagram_square")][:3]
    inputs = inputs_text(VariantInputs(
        ProductPin("b" * 64, ".png", "packshots/bottle.png", "centre:0.6:0.05:0.35"),
        ControlPin("c" * 64, ".png", "layouts/sketch.png", "scribble", "d" * 64, "demo-scribble", 0.9, 0.0, 1.0)))
    with db.session() as s:
        for vid, error, flag in ((kept, 0.0, False), (changed, 31.5, True)):
            s.get(Variant, vid).inputs = inputs
            asset = s.scalar(select(Asset).where(Asset.variant_id == vid))
            asset.product_error, asset.product_changed, asset.product_outline = error, flag, OUTLINE
        campaign_id = s.scalar(select(Campaign.id))
    app = create_app(sqlite_db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs", samplers=known_samplers())
    try:
        browser = Browser(app, "vic")
        page = html.unescape(browser.get(f"/campaigns/{campaign_id}/gallery").text)
        cards = {vid: page[page.index(f'id="variant-{vid}"'):] for vid in (kept, changed, plain)}
        for vid in (kept, changed, plain):
            cards[vid] = cards[vid][:cards[vid].index("</article>")]
        assert f'class="product-outline"' in cards[kept] and f'd="{OUTLINE}"' in cards[kept]
        assert "badge-product-changed" not in cards[kept]
        assert "badge-product-changed" in cards[changed] and "product changed" in cards[changed]
        assert "product-outline" not in cards[plain] and "badge-product-changed" not in cards[plain]
        detail = html.unescape(browser.get(f"/variants/{changed}").text)
        assert 'id="field-product"' in detail and "packshots/bottle.png" in detail and "bbbbbbbbbbbb" in detail
        assert "differs from the packshot (mean 31.50)" in detail
        assert 'id="field-control"' in detail and "scribble · layouts/sketch.png" in detail and "demo-scribble weight 0.9" in detail
        assert "kept (mean difference 0.00)" in html.unescape(browser.get(f"/variants/{kept}").text)
        data = browser.get(f"/api/variants/{changed}").json()["inputs"]
        assert data["product"]["changed"] is True and data["control"]["model"] == "demo-scribble"
    finally:
        app.state.db.dispose()
    db.dispose()

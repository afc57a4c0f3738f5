"""The variant page of a branded asset: the delivered (overlaid) picture beside the clean one, the brand facts (kit,
layout, what each element drew, its measured contrast), the "Show safe zones" boxes, and the route serving the
clean file under the same rules as the delivered one."""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import select

from review.app import create_app
from storage.assets import clean_storage_key, open_store
from storage.database import open_database
from storage.schema import Asset, Variant
from storage.variants import OverlayPin, overlay_text
from tests.review.world import Browser, World, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

KIT = "ab12cd34ef56" + "7" * 52
PIN = OverlayPin("acme", KIT, "square", "Fresh for spring", "Crisp <b>bold</b> flavours", "Shop now")
# What flows.brand.compose records, for a 400x400 instagram_square file (boxes: [left, top, width, height]).
RECORD = {
    "brand": "acme", "kit": KIT, "layout": "square", "layout_engine": "raqm", "size": [400, 400],
    "safe": [20, 40, 360, 320], "min_contrast": 4.5,
    "logo": {"variant": "dark", "box": [20, 40, 120, 40], "contrast": 11.43},
    "headline": {"text": "Fresh for spring", "box": [20, 100, 360, 60], "size": 40, "lines": ["Fresh for spring"],
                 "direction": "ltr", "colour": "#141414", "choice": "alternate", "contrast": 11.43},
    "body": {"text": "Crisp <b>bold</b> flavours", "box": [20, 170, 360, 80], "size": 18,
             "lines": ["Crisp <b>bold</b> flavours"], "direction": "ltr", "colour": "#FFFFFF", "choice": "scrim",
             "scrim": "#141414", "scrim_opacity": 0.55, "panel": [20, 170, 300, 30], "contrast": 5.34},
    "cta": {"text": "Shop now", "box": [20, 300, 360, 60], "button": [140, 310, 120, 40], "size": 16,
            "lines": ["Shop now"], "colour": "#FFFFFF", "choice": "button", "background": "#0B6E4F", "contrast": 6.25},
    "moved_for_product": ["cta"],
}
# The rectangles the safe-zone view must draw: (kind, element, x, y, width, height).
ZONES = [("safe", "safe", 20, 40, 360, 320), ("box", "logo", 20, 40, 120, 40), ("box", "headline", 20, 100, 360, 60),
         ("box", "body", 20, 170, 360, 80), ("box", "cta", 20, 300, 360, 60), ("button", "cta", 140, 310, 120, 40)]


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (400, 400), colour).save(out, "PNG")
    return out.getvalue()


CLEAN = _png((30, 160, 200))


@dataclass
class Branded:
    world: World
    app: FastAPI
    branded: int  # variant ids
    plain: int
    clean_key: str


@pytest.fixture
def branded(sqlite_db_url: str, tmp_path: Path) -> Iterator[Branded]:
    """A world whose first instagram_square variant carries an overlay, its clean picture stored beside it."""
    store_url = str(tmp_path / "assets")
    db = open_database(sqlite_db_url)
    world = build_world(db, open_store(store_url), store_url)
    vid, plain = world.variants[("hero-01", "instagram_square")][:2]
    with db.session() as s:
        s.get(Variant, vid).overlay = overlay_text(PIN)
        asset = s.scalar(select(Asset).where(Asset.variant_id == vid))
        clean_key = world.store.put(clean_storage_key(asset.storage_key), CLEAN, "image/png").key
        asset.clean_key, asset.overlay = clean_key, json.dumps(RECORD, sort_keys=True)
    app = create_app(sqlite_db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs")
    try:
        yield Branded(world, app, vid, plain, clean_key)
    finally:
        app.state.db.dispose()
        db.dispose()


def _element(page: str, name: str) -> str:
    m = re.search(rf'<dd class="brand-element" id="brand-{name}"[^>]*>(.*?)</dd>', page, re.S)
    assert m, f"no {name} in the Brand section"
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))


def test_the_variant_page_shows_both_pictures_and_the_brand_facts(branded: Branded) -> None:
    b, aid = Browser(branded.app, "vic"), branded.world.asset_of(branded.branded)
    page = b.get(f"/variants/{branded.branded}").text
    assert f'id="img-overlaid" src="/assets/{aid}"' in page and f'id="img-clean" src="/assets/{aid}/clean"' in page
    assert "<figcaption>With overlay</figcaption>" in page and "<figcaption>Clean</figcaption>" in page
    assert 'id="safe-zones-toggle"' in page and "Show safe zones" in page
    assert f"/thumbs/{aid}" not in page  # full-size files both, so the comparison is of the same pixels
    assert "<h3>Brand</h3>" in page
    assert re.search(r'id="field-brand">acme<', page)
    assert f'<code class="sha" title="{KIT}">{KIT[:12]}</code>' in page
    assert "square · raqm text layout" in page and "4.50:1" in page
    assert _element(page, "logo") == "dark variant · contrast 11.43:1"
    assert _element(page, "headline") == "Fresh for spring · 40 px · #141414 · alternate colour · contrast 11.43:1"
    assert _element(page, "body") == ("Crisp <b>bold</b> flavours · 18 px · #FFFFFF · on a scrim #141414 at 55% opacity"
                                      " · contrast 5.34:1")
    assert _element(page, "cta") == ("Shop now · 16 px · #FFFFFF · on a button #0B6E4F · contrast 6.25:1"
                                     " · moved beside the product")
    assert "<b>bold</b>" not in page  # copy is text, never markup
    assert page.count("moved beside the product") == 1
    data = b.get(f"/api/variants/{branded.branded}").json()["overlay"]
    assert data["brand"] == "acme" and data["clean_key"] == branded.clean_key
    assert [e["name"] for e in data["elements"]] == ["logo", "headline", "body", "cta"]
    assert b.get(f"/api/variants/{branded.plain}").json()["overlay"] is None


def test_the_safe_zone_svg_draws_every_recorded_box(branded: Branded) -> None:
    page = Browser(branded.app, "vic").get(f"/variants/{branded.branded}").text
    m = re.search(r'<svg class="safe-zones".*?</svg>', page, re.S)
    assert m, "no safe-zone overlay"
    svg = ET.fromstring(m.group(0))
    assert svg.get("viewBox") == "0 0 400 400" and svg.get("preserveAspectRatio") == "none"
    rects = [(r.get("data-kind"), r.get("data-element"), *(int(r.get(a)) for a in ("x", "y", "width", "height")))
             for r in svg.iter("rect")]
    assert rects == ZONES


def test_the_clean_route_serves_the_clean_file(branded: Branded) -> None:
    b, aid = Browser(branded.app, "vic"), branded.world.asset_of(branded.branded)
    r = b.get(f"/assets/{aid}/clean")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(CLEAN).hexdigest()
    assert r.content != b.get(f"/assets/{aid}").content  # the delivered file is the overlaid one


def test_the_clean_route_refuses_like_the_delivered_file(branded: Branded) -> None:
    w, aid, plain_aid = branded.world, branded.world.asset_of(branded.branded), branded.world.asset_of(branded.plain)
    anon = Browser(branded.app)
    assert anon.get(f"/assets/{aid}").status_code == 401
    assert anon.get(f"/assets/{aid}/clean").status_code == 401
    vic = Browser(branded.app, "vic")
    for url in (f"/assets/{plain_aid}/clean", "/assets/999999/clean", "/assets/..%2f..%2fsecret/clean"):
        assert vic.get(url).status_code == 404, url
    # A recorded key the stores would refuse, or one whose file is gone: 404, never the validation message.
    for key in ("../../secret.png", "/etc/passwd", "clean/spring-launch/gone.png"):
        with w.db.session() as s:
            s.get(Asset, aid).clean_key = key
        r = vic.get(f"/assets/{aid}/clean")
        assert r.status_code == 404 and "invalid asset key" not in r.text, key


def test_an_asset_without_overlay_keeps_its_page(branded: Branded) -> None:
    b, aid = Browser(branded.app, "vic"), branded.world.asset_of(branded.plain)
    page = b.get(f"/variants/{branded.plain}").text
    assert (f'<a href="/assets/{aid}" id="full-size-link"><img class="preview" src="/thumbs/{aid}?w=640" '
            f'alt="variant {branded.plain}"></a>') in page
    for absent in ("brand-overlay", "<h3>Brand</h3>", "safe-zones", "/clean", "With overlay"):
        assert absent not in page, absent


def test_a_damaged_record_still_renders(branded: Branded) -> None:
    """A record the page cannot read (hand-edited, truncated) is named, not a 500; the clean picture still shows."""
    aid = branded.world.asset_of(branded.branded)
    b = Browser(branded.app, "vic")
    with branded.world.db.session() as s:
        s.get(Asset, aid).overlay = '{"safe": [1, 2], "logo": "x", "cta": {"box": ["a", 0, 1, 1]'
    page = b.get(f"/variants/{branded.branded}").text
    assert 'id="brand-unreadable"' in page and f'src="/assets/{aid}/clean"' in page
    assert 'id="field-brand">acme<' in page  # from the variant's pin
    assert "safe-zones" not in page.replace("safe-zones-toggle", "")
    with branded.world.db.session() as s:
        s.get(Asset, aid).overlay = json.dumps({"safe": [1, 2], "logo": "x", "cta": {"box": ["a", 0, 1, 1], "contrast": True}})
    page = b.get(f"/variants/{branded.branded}").text
    assert 'id="brand-unreadable"' not in page and 'id="brand-cta"' in page and "contrast" not in _element(page, "cta")

"""Flagged assets in the gallery (storage.releases): blurred in the pixels, refused by every file route for every role
until an admin releases them, the release audited, from the page's button, the API or ``adforge release``.

Assets are flagged the way flows.recording records the image filter's finding (``flagged`` + ``flags``); the whole
path from a run's detector to the export is tests/flows/test_image_filter.py."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import app as cli_app
from cli.options import actor
from review.app import create_app
from review.thumbs import blur_strongly
from storage.assets import open_store
from storage.database import open_database
from storage.schema import Asset
from tests.helpers import high_frequency
from tests.review.world import Browser, audit_entries, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

FINDINGS = json.dumps({"detector": "sd-safety-checker", "hash": "abcdef1234", "sha256": "ab" * 32, "concepts": [3],
                       "special_care": [], "max_score": 0.012})


def _noise_png(w: int, h: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


class Flagged:
    def __init__(self, db_url: str, tmp_path: Path):
        self.db_url, self.store_url = db_url, str(tmp_path / "assets")
        self.db, self.store = open_database(db_url), open_store(self.store_url)
        self.world = build_world(self.db, self.store, self.store_url, per_channel=2)
        self.variant_id = self.world.variants[("hero-01", "instagram_square")][0]
        self.other_variant = self.world.variants[("hero-01", "instagram_square")][1]
        self.asset_id, self.other_id = self.world.assets[self.variant_id], self.world.assets[self.other_variant]
        key = self.world.keys[self.asset_id]
        self.data = _noise_png(400, 400)  # detail a blur must remove
        stored = self.store.put(key, self.data, "image/png")
        clean = self.store.put("clean/" + key, self.data, "image/png")
        with self.db.session() as s:
            asset = s.get(Asset, self.asset_id)
            asset.sha256, asset.size_bytes, asset.clean_key = stored.sha256, stored.size, clean.key
            asset.flagged, asset.flags = True, FINDINGS
            s.get(Asset, self.other_id).flagged = False
        self.key = key
        self.app = create_app(db_url, self.store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs")

    def close(self) -> None:
        self.app.state.db.dispose()
        self.db.dispose()


@pytest.fixture
def flagged(db_url: str, tmp_path: Path) -> Iterator[Flagged]:
    f = Flagged(db_url, tmp_path)
    yield f
    f.close()


@pytest.fixture
def sqlite_flagged(sqlite_db_url: str, tmp_path: Path) -> Iterator[Flagged]:
    f = Flagged(sqlite_db_url, tmp_path)
    yield f
    f.close()


def test_every_role_is_refused_the_file_and_sees_it_blurred(flagged: Flagged) -> None:
    f = flagged
    for name in ("ada", "rita", "vic"):
        b = Browser(f.app, name)
        for url in (f"/assets/{f.asset_id}", f"/files/{f.key}", f"/assets/{f.asset_id}/clean"):
            r = b.get(url, headers={"Accept": "application/json"})
            assert r.status_code == 403, (name, url)
            assert r.json()["detail"] == (f"asset {f.asset_id} is flagged by the image filter; an admin must release it "
                                          "before its file is served or exported")
            page = b.get(url)  # a browser gets the error page, never the bytes
            assert page.status_code == 403 and "flagged by the image filter" in page.text and f.data not in page.content
        assert b.get(f"/assets/{f.other_id}").status_code == 200
        for w in (160, 320, 640):
            thumb = b.get(f"/thumbs/{f.asset_id}?w={w}")
            assert thumb.status_code == 200 and thumb.headers["cache-control"] == "no-store"
            assert thumb.headers["x-adforge-flagged"] == "1"
            with Image.open(io.BytesIO(thumb.content)) as im:
                assert im.size == (min(w, 400),) * 2  # thumbnails never enlarge
    # Blurred in the pixels: little of the original's fine detail is left (measured against the same picture's
    # ordinary thumbnail, made by the same cache).
    sharp = f.app.state.thumbs.get(f.store, f.key, "sharp-reference", 320)
    blurred = Browser(f.app, "vic").get(f"/thumbs/{f.asset_id}?w=320").content
    assert high_frequency(blurred) < 0.02 * high_frequency(sharp.read_bytes())


def test_gallery_and_variant_page_show_the_flag_and_only_admins_a_release_button(sqlite_flagged: Flagged) -> None:
    f = sqlite_flagged
    campaign = f.world.campaign_id
    html = Browser(f.app, "rita").get(f"/campaigns/{campaign}/gallery").text
    cards = {m.group(1): m.group(0) for m in re.finditer(r'id="variant-(\d+)".*?</article>', html, flags=re.S)}
    assert 'data-field="flagged"' in cards[str(f.variant_id)] and ">flagged<" in cards[str(f.variant_id)]
    assert 'data-field="flagged"' not in cards[str(f.other_variant)]
    page = Browser(f.app, "ada").get(f"/variants/{f.variant_id}").text
    assert 'id="badge-flagged"' in page and 'id="btn-release"' in page and f'href="/assets/{f.asset_id}"' not in page
    page = Browser(f.app, "rita").get(f"/variants/{f.variant_id}").text
    assert 'id="badge-flagged"' in page and 'id="btn-release"' not in page
    detail = Browser(f.app, "vic").get(f"/api/variants/{f.variant_id}").json()
    assert detail["filter"]["withheld"] is True and detail["filter"]["findings"]["concepts"] == [3]


def test_release_needs_an_admin_and_csrf_and_is_audited_once(flagged: Flagged) -> None:
    f = flagged
    for name in ("vic", "rita"):
        r = Browser(f.app, name).post_json(f"/api/assets/{f.asset_id}/release", {})
        assert r.status_code == 403 and "admin role" in r.json()["detail"]
    ada = Browser(f.app, "ada")
    assert ada.post_json(f"/api/assets/{f.asset_id}/release", {}, token=None).status_code == 403  # no CSRF token
    assert ada.post_form(f"/assets/{f.asset_id}/release", token="forged").status_code == 403
    r = ada.post_json(f"/api/assets/{f.other_id}/release", {})
    assert r.status_code == 409 and "not flagged" in r.json()["detail"]
    assert ada.post_json("/api/assets/999999/release", {}).status_code == 404
    assert audit_entries(f.db, action="asset.released") == []
    assert ada.get(f"/assets/{f.asset_id}").status_code == 403

    r = ada.post_form(f"/assets/{f.asset_id}/release")  # the variant page's button
    assert r.status_code == 303 and r.headers["location"] == f"/variants/{f.variant_id}"
    assert "released by ada" in ada.get(r.headers["location"]).text
    again = ada.post_json(f"/api/assets/{f.asset_id}/release", {}).json()
    assert again["changed"] is False and again["released_by"] == "ada"
    [entry] = audit_entries(f.db, action="asset.released")
    assert (entry.actor, entry.entity, entry.entity_id) == ("ada", "asset", str(f.asset_id))
    assert entry.before == {"flagged": True, "released_by": None, "released_at": None}
    assert entry.after["released_by"] == "ada" and json.loads(entry.after["flags"])["concepts"] == [3]

    vic = Browser(f.app, "vic")
    assert vic.get(f"/assets/{f.asset_id}").content == f.data
    assert vic.get(f"/files/{f.key}").content == f.data
    assert vic.get(f"/assets/{f.asset_id}/clean").status_code == 200
    thumb = vic.get(f"/thumbs/{f.asset_id}?w=320")
    assert "immutable" in thumb.headers["cache-control"] and "x-adforge-flagged" not in thumb.headers
    assert Browser(f.app, "rita").get(f"/api/variants/{f.variant_id}").json()["filter"]["withheld"] is False


def test_cli_release_names_an_enabled_admin(sqlite_flagged: Flagged) -> None:
    f = sqlite_flagged

    def release(*args: object):
        result = CliRunner().invoke(cli_app, ["release", *map(str, args), "--db", f.db_url])
        return result.exit_code, re.sub(r"\s+", " ", result.output)

    code, out = release(f.asset_id, "--by", "rita")
    assert code == 2 and "--by: 'rita' is a reviewer; an enabled admin releases assets" in out
    code, out = release(f.asset_id, "--by", "nobody")
    assert code == 2 and "no user 'nobody'" in out
    code, out = release(f.other_id, "--by", "ada")
    assert code == 2 and f"asset {f.other_id} is not flagged" in out
    assert audit_entries(f.db, action="asset.released") == []
    code, out = release(f.asset_id, "--by", "ada")
    assert code == 0 and f"asset {f.asset_id}: released by ada at " in out
    [entry] = audit_entries(f.db, action="asset.released")
    assert entry.actor == f"{actor()} as ada"
    with f.db.session() as s:
        assert s.get(Asset, f.asset_id).released_by == "ada"
    code, out = release(f.asset_id, "--by", "ada")
    assert code == 0 and "already released by ada" in out


def test_the_blur_leaves_no_detail_whatever_the_shape() -> None:
    rng = np.random.default_rng(3)
    for w, h in ((320, 320), (320, 40), (25, 320), (7, 5)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = blur_strongly(im)
        assert out.size == (w, h)
        a, b = np.asarray(im, dtype=np.float32), np.asarray(out, dtype=np.float32)
        if min(w, h) > 8:
            assert np.abs(np.diff(b, axis=1)).mean() < 0.05 * np.abs(np.diff(a, axis=1)).mean()
        assert abs(a.mean() - b.mean()) < 8  # the picture's overall colour stays

"""The review gallery over HTTP (FastAPI TestClient): sign-in and roles, CSRF, escaping, path traversal, thumbnails,
review actions and their audit entries, A/B groups and readiness, export, results, audit export, S3 assets.

The database is filled by inserting rows through ``storage.schema`` the way ``flows.recording`` writes them after a
run, with small real PNG files in the asset store; no model is loaded. Tests where the database matters run on
SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import func, select

from cli.review import known_samplers
from review.app import create_app
from storage.assets import open_store
from storage.database import open_database
from storage.review_schema import ABResult, ExportRecord, RerenderRequest, ReviewState
from storage.schema import Asset, ModelRecord, Run
from tests.review.world import PASSWORD, Browser, World, _png, audit_entries, build_world

SCRIPT_PROMPT = '<script>alert("pwned")</script> a red bicycle & "quotes"'

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")  # every test here signs users in


@dataclass
class Gallery:
    world: World
    app: FastAPI
    cache_dir: Path

    def browser(self, name: str | None = None) -> Browser:
        return Browser(self.app, name)


def _gallery(db_url: str, store_url: str, tmp_path: Path, **world_kw) -> Iterator[Gallery]:
    db = open_database(db_url)
    store = open_store(store_url)
    world = build_world(db, store, store_url, **world_kw)
    app = create_app(db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs", samplers=known_samplers())
    try:
        yield Gallery(world, app, tmp_path / "thumbs")
    finally:
        app.state.db.dispose()
        db.dispose()


@pytest.fixture
def gallery(db_url: str, tmp_path: Path) -> Iterator[Gallery]:
    """On SQLite and PostgreSQL."""
    yield from _gallery(db_url, str(tmp_path / "assets"), tmp_path)


@pytest.fixture
def sqlite_gallery(sqlite_db_url: str, tmp_path: Path) -> Iterator[Gallery]:
    """For behaviour that does not depend on the database backend."""
    yield from _gallery(sqlite_db_url, str(tmp_path / "assets"), tmp_path)


# ------------------------------------------------------------------------------------------------ sign-in and roles


def test_everything_needs_sign_in(sqlite_gallery: Gallery) -> None:
    anon = sqlite_gallery.browser()
    w = sqlite_gallery.world
    vid = w.variants[("hero-01", "instagram_square")][0]
    r = anon.get(f"/campaigns/{w.campaign_id}/gallery?status=pending")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/campaigns/")
    for url in (f"/api/variants/{vid}", f"/thumbs/{w.asset_of(vid)}", f"/assets/{w.asset_of(vid)}",
                f"/files/{w.keys[w.asset_of(vid)]}"):
        assert anon.get(url).status_code == 401, url
    assert anon.review(vid, status="approved").status_code == 401  # token valid (login page), but nobody signed in
    assert anon.get("/healthz").status_code == 200


def test_sign_in_checks_password_and_refuses_open_redirects(sqlite_gallery: Gallery) -> None:
    b = sqlite_gallery.browser()
    wrong = b.post_form("/login", {"name": "rita", "password": "nope", "next": "/"})
    assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
    unknown = b.post_form("/login", {"name": "nobody", "password": PASSWORD, "next": "/"})
    assert unknown.status_code == 401
    ok = b.post_form("/login", {"name": "rita", "password": PASSWORD, "next": "//evil.example/x"})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    signed_in = [e for e in audit_entries(sqlite_gallery.world.db, action="user.signed_in")]
    assert [e.actor for e in signed_in] == ["rita"]


def test_permissions_per_role(gallery: Gallery) -> None:
    w = gallery.world
    vid = w.variants[("hero-01", "instagram_square")][0]
    viewer, reviewer, admin = gallery.browser("vic"), gallery.browser("rita"), gallery.browser("ada")
    before = len(audit_entries(w.db))

    # The viewer reads everything ...
    for url in ("/", f"/campaigns/{w.campaign_id}", f"/campaigns/{w.campaign_id}/gallery", f"/variants/{vid}",
                f"/api/variants/{vid}", f"/campaigns/{w.campaign_id}/results", f"/thumbs/{w.asset_of(vid)}"):
        assert viewer.get(url).status_code == 200, url
    page = viewer.get(f"/campaigns/{w.campaign_id}/gallery").text
    assert 'data-can-review="0"' in page and 'data-role="viewer"' in page
    assert 'id="review-form"' not in viewer.get(f"/variants/{vid}").text  # no review buttons for a viewer
    # ... and changes nothing.
    assert viewer.review(vid, status="approved").status_code == 403
    assert viewer.post_json(f"/api/variants/{vid}/rerender", {}).status_code == 403
    assert viewer.post_form(f"/variants/{vid}/review", {"status": "approved"}).status_code == 403
    assert viewer.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("r.csv", b"asset_id,impressions,clicks\n")}
                            ).status_code == 403
    assert viewer.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 1, "confidence": 0.9}).status_code == 403
    # Reviewers review but do not change campaign settings; admins do both.
    assert reviewer.review(vid, status="approved").status_code == 200
    assert reviewer.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 1, "confidence": 0.9}).status_code == 403
    assert admin.review(vid, starred=True).status_code == 200
    assert admin.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 1, "confidence": 0.9}).status_code == 303

    actions = [(e.actor, e.action) for e in audit_entries(w.db)[before:] if e.action != "user.signed_in"]
    assert actions == [("rita", "review.approved"), ("ada", "review.starred"), ("ada", "campaign.review_settings")]


def test_a_changed_account_ends_its_sessions(sqlite_gallery: Gallery) -> None:
    from storage.review_schema import User

    b = sqlite_gallery.browser("rita")
    assert b.get("/").status_code == 200
    with sqlite_gallery.world.db.session() as s:
        s.scalar(select(User).where(User.name == "rita")).role = "viewer"  # e.g. demoted by an admin
    assert b.get("/").status_code == 303  # back to the sign-in page, not silently a viewer with a reviewer's cookie


# ------------------------------------------------------------------------------------------------ CSRF


def test_csrf_is_required_for_every_state_change(sqlite_gallery: Gallery) -> None:
    w = sqlite_gallery.world
    vid = w.variants[("hero-01", "instagram_square")][0]
    rita, ada = sqlite_gallery.browser("rita"), sqlite_gallery.browser("ada")
    before = len(audit_entries(w.db))

    assert rita.post_json(f"/api/variants/{vid}/review", {"status": "approved"}, token=None).status_code == 403
    assert rita.post_json(f"/api/variants/{vid}/review", {"status": "approved"}, token="forged").status_code == 403
    # A valid token of another session is still not this session's token.
    assert rita.post_json(f"/api/variants/{vid}/review", {"status": "approved"}, token=ada.csrf).status_code == 403
    assert rita.post_json(f"/api/variants/{vid}/rerender", {}, token=None).status_code == 403
    assert rita.post_form(f"/variants/{vid}/review", {"status": "rejected"}, token=None).status_code == 403
    assert rita.post_form(f"/variants/{vid}/rerender", token=None).status_code == 403
    assert rita.post_form(f"/campaigns/{w.campaign_id}/results", token=None,
                          files={"file": ("r.csv", b"asset_id,impressions,clicks\n1,10,1\n")}).status_code == 403
    assert ada.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 1, "confidence": 0.9},
                         token=None).status_code == 403
    assert ada.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"}, token=None).status_code == 403
    assert rita.post_form("/logout", token=None).status_code == 403
    fresh = sqlite_gallery.browser()
    assert fresh.post_form("/login", {"name": "rita", "password": PASSWORD}, token=None).status_code == 403

    with w.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ReviewState)) == 0
        assert s.scalar(select(func.count()).select_from(RerenderRequest)) == 0
    assert len(audit_entries(w.db)) == before  # nothing happened, so nothing was recorded
    # With the token, the same request goes through.
    assert rita.post_json(f"/api/variants/{vid}/review", {"status": "approved"}).status_code == 200


# ------------------------------------------------------------------------------------------------ escaping


def test_user_text_is_escaped(sqlite_db_url: str, tmp_path: Path) -> None:
    for g in _gallery(sqlite_db_url, str(tmp_path / "assets"), tmp_path, prompt=SCRIPT_PROMPT,
                      row_keys=('<img src=x onerror="alert(1)">', "hero-02")):
        w = g.world
        b = g.browser("rita")
        vid = next(iter(w.variants.values()))[0]
        pages = [b.get(f"/campaigns/{w.campaign_id}/gallery"), b.get(f"/variants/{vid}"), b.get(f"/campaigns/{w.campaign_id}"),
                 b.get(f"/compare?ids={vid},{vid + 1}")]
        for page in pages:
            assert page.status_code == 200
            assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<b>bold" not in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt; a red bicycle &amp; &#34;quotes&#34;" in pages[1].text
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in pages[0].text
        # The API hands the text back as data (JSON), which the page's script puts in with textContent.
        api = b.get(f"/api/variants/{vid}")
        assert api.headers["content-type"].startswith("application/json") and api.json()["prompt"] == SCRIPT_PROMPT
        js = b.get("/static/gallery.js").text
        assert ".innerHTML" not in js and "insertAdjacentHTML" not in js and "textContent" in js


# ------------------------------------------------------------------------------------------------ files


def test_asset_urls_cannot_escape_the_store(sqlite_gallery: Gallery, tmp_path: Path) -> None:
    w = sqlite_gallery.world
    b = sqlite_gallery.browser("vic")
    aid = w.asset_of(w.variants[("hero-01", "leaderboard")][0])
    good = b.get(f"/files/{w.keys[aid]}")
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"
    assert hashlib.sha256(good.content).hexdigest() == hashlib.sha256(w.store.get(w.keys[aid])).hexdigest()
    assert b.get(f"/assets/{aid}").content == good.content

    (tmp_path / "secret.txt").write_text("outside the store")
    w.store.put("unrecorded/notes.png", b"not an asset", "image/png")  # inside the store, but no asset's file
    probes = [
        "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt", "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/files/%2Fetc%2Fpasswd", "/files//etc/passwd", "/files/spring-launch%5c..%5c..%5csecret.txt",
        f"/files/{w.keys[aid]}/..", f"/files/{w.keys[aid].split('/')[0]}/../secret.txt", "/files/unrecorded/notes.png",
        "/files/%00", "/assets/999999", "/assets/..%2f..%2fsecret.txt", "/thumbs/999999", "/static/..%2fapp.py",
        "/static/%2e%2e/app.py",
    ]
    for url in probes:
        r = b.client.get(url)  # the test client sends the path as written: %2e%2e is not resolved on the way
        assert r.status_code == 404, (url, r.status_code)
        assert b"outside the store" not in r.content and b"not an asset" not in r.content


def test_thumbnails_are_resized_and_cached(sqlite_gallery: Gallery) -> None:
    w = sqlite_gallery.world
    b = sqlite_gallery.browser("vic")
    thumbs = sqlite_gallery.app.state.thumbs
    square = w.asset_of(w.variants[("hero-01", "instagram_square")][0])
    wide = w.asset_of(w.variants[("hero-01", "leaderboard")][0])

    r = b.get(f"/thumbs/{square}?w=160")
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert "private" in r.headers["cache-control"] and r.headers["etag"]
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "WEBP" and im.size == (160, 160)  # from 400x400
    with Image.open(io.BytesIO(b.get(f"/thumbs/{wide}?w=320").content)) as im:
        assert im.size == (320, 40)  # 728x90 scaled to fit 320 wide, aspect kept
    assert (thumbs.misses, thumbs.hits) == (2, 0)

    # Cached on disk by sha256 and width: a second request does not touch the store at all.
    with w.db.session() as s:
        sha = s.get(Asset, square).sha256
    assert thumbs.path_for(sha, 160).is_file()
    w.store.delete(w.keys[square])
    again = b.get(f"/thumbs/{square}?w=160")
    assert again.status_code == 200 and again.content == r.content and (thumbs.misses, thumbs.hits) == (2, 1)
    assert b.get(f"/thumbs/{square}?w=320").status_code == 404  # not cached at that width, and the file is gone
    assert b.get(f"/thumbs/{wide}?w=5000").status_code == 404  # only the fixed widths: no cache filling by URL


def test_s3_assets_are_presigned_or_proxied(sqlite_db_url: str, s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    store_url = f"s3://{s3_bucket}/adforge?endpoint_url={s3_endpoint}"
    for g in _gallery(sqlite_db_url, store_url, tmp_path, per_channel=1):
        w = g.world
        b = g.browser("vic")
        aid = w.asset_of(w.variants[("hero-01", "instagram_square")][0])
        original = w.store.get(w.keys[aid])

        r = b.get(f"/assets/{aid}")
        assert r.status_code == 307 and r.headers["cache-control"] == "no-store"
        url = r.headers["location"]
        assert url.startswith(f"{s3_endpoint}/{s3_bucket}/adforge/") and ("X-Amz-Expires=300" in url or "Expires=" in url)
        with urllib.request.urlopen(url, timeout=30) as presigned:  # the URL itself works, without our cookie
            assert presigned.read() == original
        assert b.get(f"/files/{w.keys[aid]}").headers["location"].startswith(s3_endpoint)
        assert s3_endpoint in r.headers["content-security-policy"]  # img-src allows the redirect's target
        # Thumbnails are made from the S3 object and served by the gallery.
        with Image.open(io.BytesIO(b.get(f"/thumbs/{aid}?w=160").content)) as im:
            assert im.size == (160, 160)
        assert b.get("/files/adforge/..%2f..%2fother-bucket/x.png").status_code == 404

        proxy = create_app(sqlite_db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "t2", s3_delivery="proxy")
        try:
            pb = Browser(proxy, "vic")
            r = pb.get(f"/assets/{aid}")
            assert r.status_code == 200 and r.content == original and r.headers["content-type"] == "image/png"
        finally:
            proxy.state.db.dispose()


# ------------------------------------------------------------------------------------------------ review actions


def test_keyboard_actions_change_state_and_write_audit_entries(gallery: Gallery) -> None:
    w = gallery.world
    rita = gallery.browser("rita")
    vid = w.variants[("hero-01", "instagram_square")][1]

    r = rita.review(vid, status="approved")
    assert r.status_code == 200
    body = r.json()
    assert body["changed"] and body["review"] == {"status": "approved", "starred": False, "group": None}
    assert body["readiness"]["approved"] == 1 and body["readiness"]["needed"] == 2 and not body["readiness"]["ready"]
    assert rita.review(vid, status="approved").json()["changed"] is False  # same again: nothing to record
    assert rita.review(vid, starred=True).json()["review"]["starred"] is True
    assert rita.review(vid, group="B").json()["review"]["group"] == "B"
    assert rita.review(vid, group=None).json()["review"]["group"] is None
    assert rita.review(vid, status="rejected").json()["review"]["status"] == "rejected"
    assert rita.review(vid, status="pending", starred=False).json()["review"] == {"status": "pending", "starred": False,
                                                                                  "group": None}
    assert rita.review(vid, group="Z").status_code == 400
    assert rita.review(vid, status="maybe").status_code == 422
    assert rita.review(vid).status_code == 400  # nothing to change
    assert rita.review(999999, status="approved").status_code == 404

    entries = audit_entries(w.db, entity="variant", entity_id=str(vid))
    assert [e.action for e in entries] == ["review.approved", "review.starred", "review.grouped", "review.ungrouped",
                                           "review.rejected", "review.updated"]
    assert all(e.actor == "rita" and e.at is not None for e in entries)
    first = entries[0]
    assert first.before == {"status": "pending", "starred": False, "group": None}
    assert first.after["status"] == "approved" and first.after["channel"] == "instagram_square"
    assert entries[2].before["group"] is None and entries[2].after["group"] == "B"
    assert entries[-1].before == {"status": "rejected", "starred": True, "group": None}

    # The grid shows the state the actions left, with the attributes browser tests and the script rely on.
    rita.review(vid, status="approved", group="A", starred=True)
    page = rita.get(f"/campaigns/{w.campaign_id}/gallery").text
    card = re.search(rf'<article class="card" id="variant-{vid}"[^>]*>', page).group(0)
    assert 'data-status="approved"' in card and 'data-starred="1"' in card and 'data-group="A"' in card
    assert f'data-asset-id="{w.asset_of(vid)}"' in card and 'tabindex="0"' in card
    assert '<script src="/static/gallery.js" defer></script>' in page


def test_plain_form_review_and_filters(gallery: Gallery) -> None:
    w = gallery.world
    rita = gallery.browser("rita")
    a, b = w.variants[("hero-01", "instagram_square")][:2]
    assert rita.post_form(f"/variants/{a}/review", {"status": "approved"}).status_code == 303
    assert rita.post_form(f"/variants/{b}/review", {"status": "rejected"}).status_code == 303
    assert rita.post_form(f"/variants/{b}/review", {"starred": "1"}).status_code == 303
    assert rita.post_form(f"/variants/{a}/review", {"group": "C"}).status_code == 303
    assert "Saved." in rita.get(f"/variants/{a}").text  # the flash message after the redirect

    def shown(query: str) -> set[int]:
        page = rita.get(f"/campaigns/{w.campaign_id}/gallery?{query}")
        assert page.status_code == 200
        return {int(x) for x in re.findall(r'<article class="card" id="variant-(\d+)"', page.text)}

    everything = {v for ids in w.variants.values() for v in ids}
    assert shown("") == everything and len(everything) == 12
    assert shown("status=approved") == {a}
    assert shown("status=rejected") == {b}
    assert shown("status=pending") == everything - {a, b}
    assert shown("starred=1") == {b}
    assert shown("group=C") == {a}
    assert shown("channel=leaderboard") == set(w.variants[("hero-01", "leaderboard")] + w.variants[("hero-02", "leaderboard")])
    assert shown("template=banner") == set(w.variants[("hero-02", "instagram_square")] + w.variants[("hero-02", "leaderboard")])
    with w.db.session() as s:
        brand = s.scalar(select(ModelRecord.id).where(ModelRecord.name == "brand-v3"))
    assert shown(f"model={brand}") == shown("template=banner")
    assert shown(f"row={w.rows['hero-01']}&channel=instagram_square") == set(w.variants[("hero-01", "instagram_square")])
    assert rita.get(f"/campaigns/{w.campaign_id}/gallery?status=bogus").status_code == 400

    compare = rita.get(f"/compare?ids={a},{b}")
    assert compare.status_code == 200 and 'id="compare-table"' in compare.text
    assert re.search(r'<tr class="differs" data-field="seed">', compare.text)  # seeds differ: highlighted
    assert re.search(r'<tr class="" data-field="sampler">', compare.text)  # same sampler: not highlighted
    assert re.search(r'<tr class="" data-field="fast">', compare.text)
    assert rita.get(f"/compare?ids={a}").status_code == 400


def test_detail_has_every_setting(sqlite_gallery: Gallery) -> None:
    w = sqlite_gallery.world
    vid = w.variants[("hero-02", "leaderboard")][2]
    d = sqlite_gallery.browser("vic").get(f"/api/variants/{vid}").json()
    assert d["prompt"] == "a red bicycle, studio light" and d["negative_prompt"] == "blurry, <b>bold</b>"
    assert (d["seed"], d["sampler"], d["steps"], d["cfg_scale"], d["size"]) == (1012, "DPM++ 2M Karras", 2, 7.0, "728x90")
    assert d["fast"] == ""  # exact
    assert d["model"]["name"] == "brand-v3" and d["model"]["hash"] == "2222222222" and d["model"]["license"] == "acme-internal"
    assert d["row"]["key"] == "hero-02" and d["row"]["brief"]["file_name"] == "spring-launch.csv"
    assert d["run"]["status"] == "completed" and d["urls"]["full"] == f"/assets/{w.asset_of(vid)}"
    page = sqlite_gallery.browser("vic").get(f"/variants/{vid}").text
    for text in ("DPM++ 2M Karras", "728x90", "brand-v3", "2222222222", "acme-internal", "hero-02", "spring-launch.csv:3",
                 '<dd id="field-fast">off (exact)</dd>'):
        assert text in page


def test_rerender_requests_are_queued_once(gallery: Gallery) -> None:
    w = gallery.world
    rita = gallery.browser("rita")
    vid = w.variants[("hero-01", "leaderboard")][0]
    first = rita.post_json(f"/api/variants/{vid}/rerender", {}).json()
    assert first["queued"] is True
    assert rita.post_json(f"/api/variants/{vid}/rerender", {}).json() == {**first, "queued": False}
    other = rita.post_form(f"/variants/{vid}/rerender", {"seed": "77", "steps": "30", "cfg_scale": "", "sampler": "Euler a"})
    assert other.status_code == 303
    assert rita.post_json(f"/api/variants/{vid}/rerender", {"steps": 0}).status_code == 400
    with w.db.session() as s:
        requests = list(s.scalars(select(RerenderRequest).order_by(RerenderRequest.id)))
    assert len(requests) == 2 and all(r.status == "queued" and r.requested_by == "rita" for r in requests)
    assert requests[0].settings["seed"] == 1000 and requests[0].settings["prompt"] == "a red bicycle, studio light"
    assert requests[0].settings["model_sha256"] == "1" * 64 and requests[0].settings["changed"] == []
    assert (requests[1].settings["seed"], requests[1].settings["steps"], requests[1].settings["sampler"]) == (77, 30, "Euler a")
    assert requests[1].settings["cfg_scale"] == 7.0 and requests[1].settings["changed"] == ["sampler", "seed", "steps"]
    entries = audit_entries(w.db, action="variant.rerender_requested")
    assert [e.after["request_id"] for e in entries] == [r.id for r in requests]
    assert entries[1].after["changed"] == {"seed": 77, "steps": 30, "sampler": "Euler a"}
    assert f'data-request-id="{requests[1].id}"' in rita.get(f"/variants/{vid}").text


# ------------------------------------------------------------------------------------------------ A/B and readiness


def test_ab_groups_and_readiness(gallery: Gallery) -> None:
    w = gallery.world
    rita, ada = gallery.browser("rita"), gallery.browser("ada")
    a, b, c = w.variants[("hero-01", "instagram_square")]
    rita.review(a, status="approved", group="A")
    r = rita.review(b, status="approved", group="B").json()
    assert r["readiness"] == {"row_id": w.rows["hero-01"], "channel": "instagram_square", "approved": 2, "needed": 2,
                              "total": 3, "ready": True}
    overview = rita.get(f"/campaigns/{w.campaign_id}").text
    row = re.search(rf'<tr class="brief-row" id="row-{w.rows["hero-01"]}"[^>]*>.*?</tr>', overview, re.S).group(0)
    assert 'data-ready="0"' in row.split(">")[0]  # the leaderboard of that row is not ready yet
    assert re.search(r'data-channel="instagram_square" data-ready="1"\s+data-approved="2" data-needed="2"', row)
    assert re.search(r'data-channel="leaderboard" data-ready="0"', row)
    grid = rita.get(f"/campaigns/{w.campaign_id}/gallery?row={w.rows['hero-01']}&channel=instagram_square").text
    assert re.search(r'<span class="readiness ready" data-ready="1"', grid)

    # An admin raises the bar for this campaign: the same two approvals are no longer enough.
    assert ada.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 3, "confidence": 0.99}).status_code == 303
    assert rita.review(c, status="rejected").json()["readiness"]["ready"] is False
    assert rita.review(c, status="approved").json()["readiness"] == {**r["readiness"], "approved": 3, "needed": 3}
    settings = audit_entries(w.db, action="campaign.review_settings")
    assert settings[0].before == {"approvals_needed": 2, "confidence": 0.95, "default": True}
    assert settings[0].after == {"approvals_needed": 3, "confidence": 0.99} and settings[0].actor == "ada"
    assert ada.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 0, "confidence": 0.9}).status_code == 400


# ------------------------------------------------------------------------------------------------ export


def _approve_for_export(w: World, rita: Browser) -> dict[str, int]:
    sq = w.variants[("hero-01", "instagram_square")]
    lb = w.variants[("hero-01", "leaderboard")]
    rita.review(sq[0], status="approved", group="A")
    rita.review(sq[1], status="approved", group="B")
    rita.review(sq[2], status="rejected")
    rita.review(lb[1], status="approved")  # no group
    rita.review(w.variants[("hero-02", "leaderboard")][0], status="approved", group="A")
    return {"sq_a": sq[0], "sq_b": sq[1], "lb": lb[1], "h2_lb": w.variants[("hero-02", "leaderboard")][0]}


def test_export_zip_has_named_files_and_a_manifest(gallery: Gallery) -> None:
    w = gallery.world
    picked = _approve_for_export(w, gallery.browser("rita"))
    vic = gallery.browser("vic")  # exporting reads; viewers may
    r = vic.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"].startswith('attachment; filename="spring-launch-approved-export')
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-export-sha256"]

    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = sorted(zf.namelist())
    assert names == sorted([
        "manifest.csv",
        "spring-launch_hero-01_instagram-square_400x400_A.png",
        "spring-launch_hero-01_instagram-square_400x400_B.png",
        "spring-launch_hero-01_728x90_v01.png",  # display units are named by size; no group -> variant index
        "spring-launch_hero-02_728x90_A.png",
    ])
    manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode("utf-8"))))
    assert list(manifest[0])[:8] == ["asset_id", "campaign", "row", "channel", "group", "file_name", "sha256", "licence"]
    by_asset = {int(m["asset_id"]): m for m in manifest}
    assert set(by_asset) == {w.asset_of(v) for v in picked.values()}
    with w.db.session() as s:
        recorded = {a.id: a.sha256 for a in s.scalars(select(Asset).where(Asset.id.in_(list(by_asset))))}
    for aid, m in by_asset.items():
        data = zf.read(m["file_name"])
        assert hashlib.sha256(data).hexdigest() == m["sha256"] == recorded[aid]
        assert data == w.store.get(w.keys[aid])
        assert m["campaign"] == "spring-launch" and m["status"] == "approved"
    a = by_asset[w.asset_of(picked["sq_a"])]
    assert (a["row"], a["channel"], a["group"], a["licence"]) == ("hero-01", "instagram_square", "A", "creativeml-openrail-m")
    assert by_asset[w.asset_of(picked["h2_lb"])]["licence"] == "acme-internal"
    assert by_asset[w.asset_of(picked["lb"])]["group"] == ""

    # Recorded and audited; the same selection again gives the same bytes.
    again = vic.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"})
    assert again.content == r.content
    with w.db.session() as s:
        exports = list(s.scalars(select(ExportRecord).order_by(ExportRecord.id)))
    assert [(e.created_by, e.file_count, e.approved_only) for e in exports] == [("vic", 4, True), ("vic", 4, True)]
    entry = audit_entries(w.db, action="campaign.exported")[0]
    assert entry.actor == "vic" and sorted(entry.after["asset_ids"]) == sorted(by_asset)
    everything = vic.post_form(f"/campaigns/{w.campaign_id}/export", {})
    assert len(zipfile.ZipFile(io.BytesIO(everything.content)).namelist()) == 12 + 1


def test_export_refuses_a_file_that_changed_in_the_store(sqlite_gallery: Gallery) -> None:
    w = sqlite_gallery.world
    rita = sqlite_gallery.browser("rita")
    vid = w.variants[("hero-01", "instagram_square")][0]
    empty = rita.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"})
    assert empty.status_code == 303  # nothing approved yet: back to the campaign with a message
    assert "has no approved assets" in rita.get(empty.headers["location"]).text
    rita.review(vid, status="approved")
    w.store.put(w.keys[w.asset_of(vid)], _png(400, 400, 3), "image/png")  # tampered with after recording
    r = rita.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"})
    assert r.status_code == 303 and "differs from its recorded sha256" in rita.get(r.headers["location"]).text
    with w.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ExportRecord)) == 0


# ------------------------------------------------------------------------------------------------ results


def test_results_import_names_winners(gallery: Gallery) -> None:
    w = gallery.world
    rita = gallery.browser("rita")
    picked = _approve_for_export(w, rita)
    zf = zipfile.ZipFile(io.BytesIO(rita.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"}).content))
    manifest = {int(m["asset_id"]): m for m in csv.DictReader(io.StringIO(zf.read("manifest.csv").decode()))}
    # hero-01 / instagram_square: A 200/1000 vs B 150/1000 (p = 0.0033: A wins).
    # hero-02 / leaderboard: only group A (plus an ungrouped asset): no test to win.
    # hero-01 / leaderboard: the ungrouped approved asset: results but no groups.
    sq_b_unapproved = w.variants[("hero-02", "instagram_square")]
    rita.review(sq_b_unapproved[0], group="A")
    rita.review(sq_b_unapproved[1], group="B")
    lines = [
        "File Name,Impressions,Clicks,Conversions",
        f"{manifest[w.asset_of(picked['sq_a'])]['file_name']},1000,200,20",
        f"{manifest[w.asset_of(picked['sq_b'])]['file_name']},1000,150,9",
        f"{manifest[w.asset_of(picked['lb'])]['file_name']},500,5,0",
    ]
    r = rita.post_form(f"/campaigns/{w.campaign_id}/results",
                       files={"file": ("week1.csv", ("\n".join(lines) + "\n").encode())})
    assert r.status_code == 303, r.text
    # A second file by asset id, ';'-separated as European spreadsheets write it: 30/1000 vs 25/1000 (p = 0.49).
    second = "asset_id;impressions;clicks\n" + "\n".join(
        f"{w.asset_of(v)};1000;{c}" for v, c in zip(sq_b_unapproved[:2], (30, 25))) + "\n"
    assert rita.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("week1-eu.csv", second.encode())}
                          ).status_code == 303

    page = rita.get(f"/campaigns/{w.campaign_id}/results").text
    win = re.search(rf'<section class="ab-test" id="test-{w.rows["hero-01"]}-instagram_square".*?</section>', page, re.S).group(0)
    assert 'data-winner="A"' in win and "group A wins" in win and "p = 0.003256" in win and "lift +33.3% (A vs B)" in win
    none = re.search(rf'<section class="ab-test" id="test-{w.rows["hero-02"]}-instagram_square".*?</section>', page, re.S).group(0)
    assert 'data-winner=""' in none and "no winner" in none and "p = 0.4942" in none and "lift +20.0%" in none
    lonely = re.search(rf'<section class="ab-test" id="test-{w.rows["hero-01"]}-leaderboard".*?</section>', page, re.S).group(0)
    assert "needs results for at least two groups" in lonely and "1 asset(s) with results have no A/B group" in lonely
    # Conversions per impression: 20/1000 vs 9/1000: pooled .0145, se = sqrt(.0145 * .9855 * .002) = .0053461,
    # z = .011 / .0053461 = 2.0576, p = 0.03963: still A at 95 %.
    conv = rita.get(f"/campaigns/{w.campaign_id}/results?metric=conversion").text
    assert "group A wins" in conv and "p = 0.03963" in conv

    with w.db.session() as s:
        stored = {x.asset_id: (x.impressions, x.clicks, x.conversions, x.source, x.imported_by) for x in s.scalars(select(ABResult))}
    assert stored[w.asset_of(picked["sq_a"])] == (1000, 200, 20, "week1.csv", "rita")
    assert stored[w.asset_of(sq_b_unapproved[1])] == (1000, 25, 0, "week1-eu.csv", "rita")
    entries = audit_entries(w.db, action="results.imported")
    assert len(entries) == 5 and entries[0].before is None and entries[0].after["clicks"] == 200

    # A corrected file replaces the numbers (before/after audited); an identical one changes nothing.
    fix = f"asset_id,impressions,clicks\n{w.asset_of(picked['sq_b'])},1000,160\n"
    rita.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("fix.csv", fix.encode())})
    rita.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("fix.csv", fix.encode())})
    entries = audit_entries(w.db, action="results.imported")
    assert len(entries) == 6 and entries[-1].before["clicks"] == 150 and entries[-1].after["clicks"] == 160


def test_bad_results_files_are_rejected_whole(gallery: Gallery) -> None:
    w = gallery.world
    rita = gallery.browser("rita")
    aid = w.asset_of(w.variants[("hero-01", "instagram_square")][0])
    bad = (f"asset_id,impressions,clicks,conversions\n{aid},100,10,1\n{aid},100,5,0\n999999,10,1,0\n"
           f"{aid + 1},10,11,0\n{aid + 2},ten,1,0\n,5,1,0\n")
    r = rita.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("bad.csv", bad.encode())})
    assert r.status_code == 400
    for text in ("bad.csv:3: asset", "listed twice", "bad.csv:4: no asset 999999", "11 clicks but only 10 impressions",
                 "&#39;ten&#39; is not a whole number", "bad.csv:7: neither asset_id nor file_name given"):
        assert text in r.text, text
    assert rita.post_form(f"/campaigns/{w.campaign_id}/results",
                          files={"file": ("x.csv", b"file_name,impressions,clicks\nnope.png,10,1\n")}).status_code == 400
    assert rita.post_form(f"/campaigns/{w.campaign_id}/results",
                          files={"file": ("x.csv", b"name,impressions\n")}).status_code == 400
    with w.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ABResult)) == 0  # the good first line was not imported either
    assert audit_entries(w.db, action="results.imported") == []


# ------------------------------------------------------------------------------------------------ audit export


def test_audit_export_has_reproduction_facts_and_every_decision(gallery: Gallery) -> None:
    w = gallery.world
    rita, ada = gallery.browser("rita"), gallery.browser("ada")
    vid = w.variants[("hero-01", "instagram_square")][0]
    aid = w.asset_of(vid)
    with w.db.session() as s:  # what the run recorded, as flows.recording writes it
        from storage.database import audit

        run_id = s.scalar(select(Run.id))
        audit(s, actor="system:run", action="variants.planned", entity="run", entity_id=run_id, run_id=run_id,
              after={"count": 12, "variant_ids": [v for ids in w.variants.values() for v in ids]})
        audit(s, actor="system:run", action="asset.stored", entity="variant", entity_id=vid, run_id=run_id,
              before={"status": "planned"}, after={"status": "done", "asset_id": aid})
    rita.review(vid, status="approved", group="A")
    rita.review(vid, status="rejected")
    rita.review(vid, status="approved")
    rita.post_json(f"/api/variants/{vid}/rerender", {"seed": 5})
    ada.post_form(f"/campaigns/{w.campaign_id}/export", {"approved": "1"})
    rita.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("r.csv", f"asset_id,impressions,clicks\n{aid},10,1\n".encode())})
    ada.post_form(f"/campaigns/{w.campaign_id}/settings", {"approvals_needed": 1, "confidence": 0.9})

    data = rita.get(f"/campaigns/{w.campaign_id}/audit.json").json()
    assert data["campaign"]["name"] == "spring-launch" and len(data["assets"]) == 12
    assert [d["action"] for d in data["campaign_decisions"]] == ["campaign.review_settings"]
    a = next(x for x in data["assets"] if x["asset_id"] == aid)
    rep = a["reproduce"]
    assert (rep["prompt"], rep["negative_prompt"], rep["seed"], rep["sampler"], rep["steps"], rep["cfg_scale"]) == \
        ("a red bicycle, studio light", "blurry, <b>bold</b>", 1000, "DPM++ 2M Karras", 2, 7.0)
    assert (rep["gen_width"], rep["out_width"], rep["postprocess"], rep["fast"]) == (64, 400, "cover-lanczos(400x400)", "")
    assert rep["model"]["sha256"] == "1" * 64 and rep["model"]["licence"] == "creativeml-openrail-m"
    assert a["file"]["sha256"] == hashlib.sha256(w.store.get(w.keys[aid])).hexdigest()
    assert a["row"]["key"] == "hero-01" and a["brief"]["file_name"] == "spring-launch.csv"
    assert a["runs"]["stored_by"]["status"] == "completed"
    assert a["review"]["status"] == "approved" and a["review"]["group"] == "A" and a["review"]["by"] == "rita"
    assert a["results"]["clicks"] == 1 and a["exports"][0]["by"] == "ada"
    actions = [d["action"] for d in a["decisions"]]
    assert actions == ["variants.planned", "asset.stored", "review.updated", "review.rejected", "review.approved",
                       "variant.rerender_requested", "campaign.exported", "results.imported"]
    approved = a["decisions"][2]
    assert approved["actor"] == "rita" and approved["at"] and approved["before"]["status"] == "pending"
    assert approved["after"]["status"] == "approved" and approved["after"]["group"] == "A"
    other = next(x for x in data["assets"] if x["asset_id"] != aid)
    assert [d["action"] for d in other["decisions"]] == ["variants.planned"]  # not another asset's decisions

    csv_text = rita.get(f"/campaigns/{w.campaign_id}/audit.csv").text
    rows = {int(r["asset_id"]): r for r in csv.DictReader(io.StringIO(csv_text))}
    assert len(rows) == 12
    row = rows[aid]
    assert row["prompt"] == "a red bicycle, studio light" and row["seed"] == "1000" and row["model_hash"] == "1111111111"
    assert row["review_status"] == "approved" and row["ab_group"] == "A" and row["decision_count"] == "8"
    assert row["fast"] == ""
    assert [d["action"] for d in json.loads(row["decisions"])] == actions


# ------------------------------------------------------------------------------------------------ static assets


def test_gallery_script_and_styles_are_served(sqlite_gallery: Gallery) -> None:
    b = sqlite_gallery.browser("vic")
    js = b.get("/static/gallery.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    for needle in ('"ArrowRight"', 'case "a"', 'case "r"', 'case "s"', '"X-CSRF-Token"', "galleryReady"):
        assert needle in js.text
    assert b.get("/static/app.css").status_code == 200

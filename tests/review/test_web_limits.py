"""The gallery under abusive requests: bodies capped before they are read (declared or streamed), unsigned state
changes turned away before their body is read, form field limits, ids out of range, unknown samplers, the access
log. Bodies here are a few MB; the mechanism is the one that bounds 600 MB (bench/abuse_web.py sends those)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import func, select

from cli.review import known_samplers
from review.app import create_app
from review.config import GalleryConfig
from storage.assets import open_store
from storage.database import open_database
from storage.review_schema import RerenderRequest
from tests.review.world import Browser, World, build_world

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

MB = 1024 * 1024
HUGE = "99999999999999999999"


@pytest.fixture
def site(sqlite_db_url: str, tmp_path: Path) -> Iterator[tuple[World, FastAPI]]:
    db = open_database(sqlite_db_url)
    store_url = str(tmp_path / "assets")
    world = build_world(db, open_store(store_url), store_url)
    app = create_app(sqlite_db_url, store_url, secret_key="test-secret", cache_dir=tmp_path / "thumbs",
                     samplers=known_samplers(), config=GalleryConfig(max_upload_bytes=1 * MB))
    yield world, app
    app.state.db.dispose()
    db.dispose()


def asgi_post(app: FastAPI, path: str, headers: dict[str, str], chunks: Iterable[bytes]) -> tuple[int, str, int]:
    """POST ``chunks`` straight through ASGI, one receive() each, as a server streams a body: (status, body, bytes
    the app pulled). A client that stops being read from is what a 600 MB body amounts to for the server."""
    pulled = 0
    source = iter(chunks)
    status, body = 0, b""

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(source, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
             "server": ("testserver", 80), "state": {},
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
    anyio.run(app, scope, receive, send)
    return status, body.decode("utf-8", "replace"), pulled


def chunks(total: int, size: int = 64 * 1024, *, first: bytes = b"") -> Iterator[bytes]:
    """``total`` bytes in ``size`` pieces, the first starting with ``first`` (a multipart part's head)."""
    for start in range(0, total, size):
        yield (first if start == 0 else b"") + b" " * min(size, total - start)


FILE_PART = b'--x\r\nContent-Disposition: form-data; name="file"; filename="r.csv"\r\n\r\n'


def signed_in_headers(b: Browser, **extra: str) -> dict[str, str]:
    return {"cookie": f"adforge_session={b.client.cookies['adforge_session']}", "x-csrf-token": b.csrf, **extra}


# ------------------------------------------------------------------------------------------------ bodies


def test_a_big_declared_body_is_refused_before_a_byte_is_read(site) -> None:
    w, app = site
    vid = w.variants[("hero-01", "instagram_square")][0]
    status, body, pulled = asgi_post(app, f"/api/variants/{vid}/review",
                                     {"content-type": "application/json", "content-length": str(600 * MB)}, chunks(2 * MB))
    assert (status, pulled) == (413, 0)
    assert body == '{"detail":"request body over the 64 KB limit for POST /api/variants/%d/review"}' % vid
    status, body, pulled = asgi_post(app, f"/campaigns/{w.campaign_id}/results",
                                     {"content-type": "multipart/form-data; boundary=x", "content-length": str(200 * MB)},
                                     chunks(2 * MB))
    assert (status, pulled) == (413, 0) and body.strip() == f"request body over the 1 MB limit for POST /campaigns/{w.campaign_id}/results"
    status, body, pulled = asgi_post(app, "/login", {"content-length": "12abc"}, chunks(10))
    assert (status, pulled) == (400, 0) and body.strip() == "invalid Content-Length header"


def test_unsigned_state_changes_are_turned_away_before_their_body_is_read(site) -> None:
    w, app = site
    vid = w.variants[("hero-01", "instagram_square")][0]
    # Chunked (no Content-Length), no cookie: 401 without pulling the body, JSON or multipart alike.
    status, body, pulled = asgi_post(app, f"/api/variants/{vid}/review", {"content-type": "application/json"}, chunks(2 * MB))
    assert (status, pulled) == (401, 0) and body == '{"detail":"sign in first"}'
    status, _, pulled = asgi_post(app, f"/campaigns/{w.campaign_id}/results",
                                  {"content-type": "multipart/form-data; boundary=x"}, chunks(2 * MB))
    assert (status, pulled) == (303, 0)  # a page: back to the sign-in page
    # Signed in, but a JSON body without the CSRF header: refused before reading too.
    rita = Browser(app, "rita")
    headers = signed_in_headers(rita, **{"content-type": "application/json"})
    del headers["x-csrf-token"]
    status, _, pulled = asgi_post(app, f"/api/variants/{vid}/review", headers, chunks(2 * MB))
    assert (status, pulled) == (403, 0)


def test_a_streamed_body_is_cut_off_at_its_routes_cap(site) -> None:
    w, app = site
    vid = w.variants[("hero-01", "instagram_square")][0]
    rita = Browser(app, "rita")
    status, body, pulled = asgi_post(app, f"/api/variants/{vid}/review",
                                     signed_in_headers(rita, **{"content-type": "application/json"}), chunks(2 * MB))
    assert status == 413 and "over the 64 KB limit for POST /api/variants" in body, body
    assert pulled <= 64 * 1024 + 64 * 1024  # the cap plus the chunk that crossed it
    # The results upload has its own, larger cap: 200 KB goes through to the importer (which rejects the content) ...
    big_csv = b"asset_id,impressions,clicks\n" + b"1,10,1\n" * 30_000
    r = rita.post_form(f"/campaigns/{w.campaign_id}/results", files={"file": ("r.csv", big_csv)})
    assert r.status_code in (303, 400) and len(big_csv) > 64 * 1024
    # ... and a streamed multipart body over that cap is cut off at it (1 MB here).
    status, body, pulled = asgi_post(app, f"/campaigns/{w.campaign_id}/results",
                                     signed_in_headers(rita, **{"content-type": "multipart/form-data; boundary=x"}),
                                     chunks(3 * MB, first=FILE_PART))
    assert status == 413 and "over the 1 MB limit" in body and pulled <= MB + 64 * 1024


def test_forms_have_field_limits(site) -> None:
    w, app = site
    vid = w.variants[("hero-01", "instagram_square")][0]
    rita = Browser(app, "rita")
    many = {f"f{i}": "x" for i in range(200)}
    r = rita.post_form(f"/variants/{vid}/review", {"status": "approved", **many})
    assert r.status_code == 400 and "Too many fields. Maximum number of fields is 32." in r.text
    fat = {f"f{i}": "x" * MB for i in range(3)}  # 200 fields of 1 MB in the probe: the body cap stops either
    assert rita.post_form(f"/variants/{vid}/review", fat).status_code == 413
    r = rita.post_form(f"/campaigns/{w.campaign_id}/results",
                       files=[("file", ("a.csv", b"asset_id\n")), ("file", ("b.csv", b"asset_id\n"))])
    assert r.status_code == 400 and "Too many files" in r.text
    # The sign-in form is open to anyone, so it is small too.
    anon = Browser(app)
    assert anon.post_form("/login", {"name": "rita", "password": "x" * (100 * 1024)}).status_code == 413


# ------------------------------------------------------------------------------------------------ ids


def _int_path_routes() -> list[tuple[str, str]]:
    from review import api, pages

    found = []
    for route in [*pages.router.routes, *api.router.routes]:
        if isinstance(route, APIRoute) and any(p.name.endswith("_id") for p in route.dependant.path_params):
            for method in route.methods:
                found.append((method, route.path))
    return found


@pytest.mark.parametrize("bad", [HUGE, "-1", "0", "abc", "9223372036854775808"])
def test_ids_out_of_range_are_not_found_never_a_crash(site, bad: str) -> None:
    w, app = site
    rita = Browser(app, "ada")  # an admin: every route lets her in, so the id is what is checked
    routes = _int_path_routes()
    assert len(routes) >= 14  # every route with an id in its path
    for method, path in routes:
        url = re.sub(r"\{(\w+)_id\}", bad, path).replace("{fmt}", "csv")
        r = rita.client.request(method, url, headers={"X-CSRF-Token": rita.csrf}, json={} if method == "POST" else None)
        assert r.status_code == 404, (method, url, r.status_code)
        assert "must be an id (1 .. 9223372036854775807)" in r.text and "\n" not in r.json()["detail"] if \
            url.startswith(("/api/", "/thumbs/", "/assets/")) else "must be an id" in r.text


def test_ids_in_query_strings_are_bad_requests(site) -> None:
    w, app = site
    rita = Browser(app, "rita")
    gallery = f"/campaigns/{w.campaign_id}/gallery"
    for query in (f"row={HUGE}", f"model={HUGE}", "model=-1", "row=²", "model=1.5"):
        r = rita.get(f"{gallery}?{query}")
        assert r.status_code == 400 and "must be an id (1 .. 9223372036854775807)" in r.text, query
    v = w.variants[("hero-01", "instagram_square")]
    assert rita.get(f"/compare?ids={HUGE},{v[0]}").status_code == 400
    assert rita.get("/compare?ids=" + ",".join(["1"] * 5000)).status_code == 400
    assert rita.get(f"/thumbs/{w.asset_of(v[0])}?w={HUGE}").status_code == 404
    assert rita.get(f"/thumbs/{w.asset_of(v[0])}?w=wide").status_code == 400
    assert rita.post_json(f"/api/variants/{v[0]}/rerender", {"seed": int(HUGE)}).status_code == 400


# ------------------------------------------------------------------------------------------------ samplers


def test_unknown_samplers_are_refused_when_queued(site) -> None:
    w, app = site
    rita = Browser(app, "rita")
    vid = w.variants[("hero-01", "leaderboard")][0]
    r = rita.post_json(f"/api/variants/{vid}/rerender", {"sampler": "Heun++ 9000"})
    assert r.status_code == 400
    assert r.json()["detail"] == ("unknown sampler 'Heun++ 9000' (known: Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM, "
                                  "LCM, LCM Karras, Euler A Turbo, DPM++ 2M Turbo, Euler SGMUniform, Euler A SGMUniform, "
                                  "DPM++ 2M SGMUniform)")
    r = rita.post_form(f"/variants/{vid}/rerender", {"sampler": "nope"})
    assert r.status_code == 400 and "unknown sampler &#39;nope&#39;" in r.text
    with w.db.session() as s:
        assert s.scalar(select(func.count()).select_from(RerenderRequest)) == 0
    # Any accepted spelling is stored as the display name the worker and the infotext use.
    assert rita.post_json(f"/api/variants/{vid}/rerender", {"sampler": "k_dpmpp_2m_karras"}).status_code == 200
    assert rita.post_json(f"/api/variants/{vid}/rerender", {"sampler": "euler ancestral"}).status_code == 200
    with w.db.session() as s:
        assert [r.settings["sampler"] for r in s.scalars(select(RerenderRequest).order_by(RerenderRequest.id))] == \
            ["DPM++ 2M Karras", "Euler a"]


def test_a_gallery_without_the_sampler_list_cannot_change_the_sampler(sqlite_db_url: str, tmp_path: Path) -> None:
    db = open_database(sqlite_db_url)
    store_url = str(tmp_path / "assets")
    w = build_world(db, open_store(store_url), store_url)
    app = create_app(sqlite_db_url, store_url, secret_key="s", cache_dir=tmp_path / "t")
    try:
        rita = Browser(app, "rita")
        vid = w.variants[("hero-01", "leaderboard")][0]
        r = rita.post_json(f"/api/variants/{vid}/rerender", {"sampler": "Euler"})
        assert r.status_code == 400 and "started without the list of samplers" in r.json()["detail"]
        assert rita.post_json(f"/api/variants/{vid}/rerender", {"seed": 5}).status_code == 200
        # The page's form sends the variant's own sampler back: that needs no list.
        page = rita.get(f"/variants/{vid}").text
        assert '<input name="sampler" value="DPM++ 2M Karras">' in page
        form = {"seed": "6", "steps": "2", "cfg_scale": "7.0", "sampler": "DPM++ 2M Karras"}
        assert rita.post_form(f"/variants/{vid}/rerender", form).status_code == 303
    finally:
        app.state.db.dispose()
        db.dispose()


def test_the_sampler_list_is_the_engines() -> None:
    from engine.samplers import SAMPLERS, get_sampler

    known = known_samplers()
    assert set(known.values()) == set(SAMPLERS)
    assert all(get_sampler(spelling).name == name for spelling, name in known.items())


# ------------------------------------------------------------------------------------------------ access log


def test_every_request_gets_an_access_log_line(site, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    w, app = site
    with caplog.at_level(logging.INFO, logger="adforge.access"):
        rita = Browser(app, "rita")
        rita.get(f"/campaigns/{w.campaign_id}/gallery?row=1")
        rita.client.post("/api/variants/1/review", content=b"x" * (100 * 1024), headers={"content-type": "application/json"})
        rita.get("/assets/%0a%1b[31mfake")
    lines = [r.getMessage() for r in caplog.records if r.name == "adforge.access"]
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z testclient (-|rita) (GET|POST) \S+ \d{3} \d+\.\dms"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert any(f" rita GET /campaigns/{w.campaign_id}/gallery?row=1 200 " in line for line in lines)
    assert any(" POST /login 303 " in line and " - POST" in line for line in lines)
    assert any(" POST /api/variants/1/review 413 " in line for line in lines)
    assert any("/assets/%0a%1b[31mfake 404" in line for line in lines)  # raw, so no newline or escape gets in


def test_the_access_log_can_go_to_a_file(sqlite_db_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    log = tmp_path / "access.log"
    app = create_app(sqlite_db_url, str(tmp_path / "a"), secret_key="s", cache_dir=tmp_path / "t",
                     config=GalleryConfig(access_log=str(log)))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
    assert re.fullmatch(r"\S+Z testclient - GET /healthz 200 \d+\.\dms\n", log.read_text())
    assert all(getattr(h, "baseFilename", None) != str(log) for h in logging.getLogger("adforge.access").handlers)


def test_the_variant_page_offers_the_known_samplers(site) -> None:
    w, app = site
    rita = Browser(app, "rita")
    vid = w.variants[("hero-01", "leaderboard")][0]
    page = rita.get(f"/variants/{vid}").text
    assert re.findall(r"<option(?: selected)?>([^<]+)</option>", page[page.index('name="sampler"'):]) == \
        ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LCM", "LCM Karras", "Euler A Turbo", "DPM++ 2M Turbo",
         "Euler SGMUniform", "Euler A SGMUniform", "DPM++ 2M SGMUniform"]
    assert "<option selected>DPM++ 2M Karras</option>" in page

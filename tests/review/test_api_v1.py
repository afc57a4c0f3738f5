"""The REST API's refusals and checks (no run is started here: tests/review/test_api_v1_runs.py starts real ones).

Token scopes and roles, revoked tokens, CSRF for cookie sessions but not for bearer tokens, upload limits and
malformed briefs (422 with the problems, as `adforge plan` words them), the row cap, the per-token rate limit, the
plan endpoint, OpenAPI. Real app, real SQLite, real tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from review.tokens import revoke_token
from tests.review.api_world import TINY_BRIEF, make_world, upload
from tests.review.world import Browser

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")


@pytest.fixture
def world(tmp_path: Path, sqlite_db_url: str, campaign_model: Path):
    w = make_world(tmp_path, sqlite_db_url, campaign_model, max_rows=3, max_upload_bytes=200_000)
    yield w
    w.app.state.db.dispose()


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    assert body["message"]
    return body


def test_me_names_the_token_user_and_scopes(world) -> None:
    r = world.client("rita-read").get("/api/v1/me")
    assert r.status_code == 200
    assert r.json() == {"name": "rita", "role": "reviewer", "via": "token", "scopes": ["read"],
                        "token_id": r.json()["token_id"]}
    assert world.client("rita-submit").get("/api/v1/me").json()["scopes"] == ["read", "submit"]


def test_no_credentials_bad_and_revoked_tokens_are_401(world) -> None:
    _error(world.client().get("/api/v1/runs"), 401, "unauthenticated")
    _error(world.client("adf_" + "x" * 43).get("/api/v1/runs"), 401, "invalid_token")
    _error(upload(world.client("adf_" + "x" * 43)), 401, "invalid_token")  # refused before the body is read
    ok = world.client("rita-read")
    assert ok.get("/api/v1/runs").status_code == 200
    token_id = ok.get("/api/v1/me").json()["token_id"]
    revoke_token(world.app.state.db, token_id, actor="test")
    _error(ok.get("/api/v1/runs"), 401, "invalid_token")


def test_read_token_cannot_submit_and_a_viewer_never_can(world) -> None:
    _error(upload(world.client("rita-read")), 403, "insufficient_scope")
    _error(upload(world.client("vic-read")), 403, "forbidden_role")
    viewer = Browser(world.app, "vic")
    r = viewer.client.post("/api/v1/runs", files={"brief": ("b.csv", TINY_BRIEF.encode(), "text/csv")},
                           headers={"X-CSRF-Token": viewer.csrf})
    _error(r, 403, "forbidden_role")
    _error(world.client("vic-read").post("/api/v1/runs/1/cancel"), 403, "forbidden_role")


def test_a_viewer_cannot_get_a_submit_token(world) -> None:
    viewer = Browser(world.app, "vic")
    r = viewer.post_json("/api/v1/tokens", {"name": "mine", "scope": "submit"})
    _error(r, 403, "forbidden_scope")
    r = viewer.post_json("/api/v1/tokens", {"name": "mine", "scope": "read"})
    assert r.status_code == 201 and r.json()["token"].startswith("adf_")
    # a token cannot mint tokens
    _error(world.client("ada-submit").post("/api/v1/tokens", json={"name": "x"}), 403, "session_required")


def test_csrf_is_needed_for_session_posts_and_not_for_bearer_tokens(world) -> None:
    rita = Browser(world.app, "rita")
    no_csrf = rita.client.post("/api/v1/plans", files={"brief": ("b.csv", TINY_BRIEF.encode(), "text/csv")})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["error"]["message"]
    with_csrf = rita.client.post("/api/v1/plans", files={"brief": ("b.csv", TINY_BRIEF.encode(), "text/csv")},
                                 headers={"X-CSRF-Token": rita.csrf})
    assert with_csrf.status_code == 200, with_csrf.text
    token = world.client("rita-submit")
    assert "adforge_session" not in token.cookies
    r = upload(token, path="/api/v1/plans")
    assert r.status_code == 200, r.text
    # a session cookie plus a bad token is not a way around CSRF
    rita.client.headers["Authorization"] = "Bearer adf_" + "y" * 43
    r = rita.client.post("/api/v1/plans", files={"brief": ("b.csv", TINY_BRIEF.encode(), "text/csv")})
    _error(r, 401, "invalid_token")


def test_plan_endpoint_shows_images_models_and_estimate(world) -> None:
    r = upload(world.client("rita-read"), path="/api/v1/plans", steps=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["problems"] == [] and body["backend"] == "local"
    plan = body["plan"]
    assert (plan["images"], plan["rows"], plan["row_channels"], plan["steps"]) == (2, 2, 2, 2)
    assert plan["groups"][0]["licence"] and plan["groups"][0]["model"]
    assert plan["estimate"]["basis"] == "default" and plan["estimate"]["device_seconds"] > 0


def test_oversized_upload_is_413(world) -> None:
    big = TINY_BRIEF + "api-test,row-x,junk,instagram_square,1\n" * 6000  # > 200 kB
    r = upload(world.client("rita-submit"), big)
    _error(r, 413, "too_large")


@pytest.mark.parametrize("name,body,expect", [
    ("brief.txt", TINY_BRIEF, "not a .csv or .xlsx file"),
    ("brief.csv", "campaign,row_id,colour\napi,r1,red\n", "subject"),
    ("brief.csv", bytes(range(256)) * 8, None),
    ("brief.xlsx", b"PK\x03\x04 not really a zip", None),
])
def test_malformed_upload_is_422_with_problems(world, name: str, body, expect: str | None) -> None:
    r = upload(world.client("rita-submit"), body, name)
    err = _error(r, 422, "unsupported_type" if name.endswith(".txt") else "invalid_brief")
    assert err["problems"], err
    assert all({"file", "line", "column", "message", "text"} <= set(p) for p in err["problems"])
    # Named by the upload's own name: never the server's temporary copy of it.
    assert "adforge-upload" not in repr(err) and all(p["file"] in (None, name) for p in err["problems"]), err
    if expect:
        assert any(expect in p["text"] for p in err["problems"]), err["problems"]
    assert world.client("rita-read").get("/api/v1/runs").json()["runs"] == []  # nothing was started


def test_a_bad_row_names_its_line_and_column(world) -> None:
    r = upload(world.client("rita-submit"), TINY_BRIEF + "api-test,row-3,a cat,tv_spot,1\n", strict="true")
    err = _error(r, 422, "invalid_brief")
    assert any(p["line"] == 4 and p["column"] == "channels" for p in err["problems"]), err["problems"]
    assert "adforge-upload" not in repr(err) and {p["file"] for p in err["problems"]} <= {"tiny.csv", None}, err


def test_too_many_rows_are_refused(world) -> None:
    rows = "".join(f"api-test,row-{i},a red circle,instagram_square,1\n" for i in range(5))
    r = upload(world.client("rita-submit"), "campaign,row_id,subject,channels,variants\n" + rows)
    err = _error(r, 422, "invalid_brief")
    assert any("row" in p["message"] and "3" in p["message"] for p in err["problems"]), err["problems"]


def test_unknown_option_and_bad_values_are_named(world) -> None:
    err = _error(upload(world.client("rita-submit"), model="/etc/passwd"), 422, "unknown_option")
    assert "model" in err["message"]
    err = _error(upload(world.client("rita-submit"), steps="lots"), 422, "invalid_option")
    assert "steps" in err["message"]
    err = _error(upload(world.client("rita-submit"), webhook_url="file:///etc/passwd"), 422, "invalid_webhook_url")


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, sqlite_db_url: str, campaign_model: Path) -> None:
    w = make_world(tmp_path, sqlite_db_url, campaign_model, api_burst=3, api_rate_per_minute=1)
    try:
        c = w.client("rita-read")
        assert [c.get("/api/v1/me").status_code for _ in range(3)] == [200, 200, 200]
        r = c.get("/api/v1/me")
        _error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert w.client("ada-submit").get("/api/v1/me").status_code == 200  # per token
    finally:
        w.app.state.db.dispose()


def test_openapi_schema_and_docs_page_list_the_operations(world) -> None:
    c = world.client("rita-read")
    schema = c.get("/api/v1/openapi.json").json()
    ops = {(m.upper(), p) for p, item in schema["paths"].items() for m in item}
    assert {("POST", "/api/v1/runs"), ("GET", "/api/v1/runs/{run_id}"), ("GET", "/api/v1/runs/{run_id}/assets"),
            ("POST", "/api/v1/runs/{run_id}/cancel"), ("GET", "/api/v1/assets/{asset_id}"), ("GET", "/api/v1/runs"),
            ("POST", "/api/v1/plans")} <= ops
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    page = c.get("/api/v1/docs")
    assert page.status_code == 200 and "/api/v1/runs/{run_id}/cancel" in page.text and "<script" not in page.text


def test_unknown_run_and_asset_are_404_json(world) -> None:
    c = world.client("rita-read")
    _error(c.get("/api/v1/runs/999"), 404, "not_found")
    _error(c.get("/api/v1/assets/999"), 404, "not_found")
    _error(c.get("/api/v1/runs/abc"), 404, "not_found")

"""The run and token pages over HTTP (TestClient; the browser tests drive the same pages in Chromium): roles, CSRF
on every form, the upload's problem table, Start with skipped rows, the run page, the brief download, the runs
list (CLI runs too) and the API token page. The run started here is real: the local worker renders a tiny brief on
the tiny test model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from review.tokens import list_tokens
from tests.review.runs_site import BAD_BRIEF, PARTIAL_BRIEF, runs_site, stop_runs, wait_terminal
from tests.review.world import Browser, World, audit_entries

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")


@pytest.fixture
def site(tmp_path: Path, campaign_model: Path, prefect_harness: str,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[World, FastAPI]]:
    # The workers are subprocesses: they find the session's Prefect server (no temporary one each) and use one thread.
    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    monkeypatch.setenv("ADFORGE_THREADS", "1")
    world, app, db = runs_site(tmp_path, model=campaign_model)
    try:
        yield world, app
    finally:
        stop_runs(app)
        app.state.db.dispose()
        db.dispose()


def upload(b: Browser, data: bytes, name: str = "brief.csv", *, csrf: bool = True, **fields: str):
    form = {**fields, **({"csrf_token": b.csrf} if csrf else {})}
    return b.client.post("/runs/new", data=form, files={"file": (name, data, "text/csv")})


def problem_rows(html: str) -> list[tuple[str, str, str]]:
    """(row, column, message) of each row of the page's problem table."""
    return [(line, column, re.sub(r"\s+", " ", message).strip()) for line, column, message in re.findall(
        r'<tr class="problem"[^>]*>.*?<td class="line">([^<]*)</td>\s*<td class="column">([^<]*)</td>'
        r'<td class="message">(.*?)</td>', html, re.S)]


def start_form_hash(html: str) -> str:
    m = re.search(r'<form method="post" action="/runs/start" id="start-form".*?name="sha256" value="([0-9a-f]{64})"',
                  html, re.S)
    assert m, "the page has no Start form"
    return m.group(1)


# ------------------------------------------------------------------------------------------------ roles and CSRF


def test_viewer_sees_no_new_run_and_is_refused(site: tuple[World, FastAPI]) -> None:
    _, app = site
    vic = Browser(app, "vic")
    page = vic.get("/runs")
    assert page.status_code == 200
    assert 'id="nav-runs"' in page.text and 'id="new-run"' not in page.text
    assert vic.get("/runs/new").status_code == 403
    refused = upload(vic, PARTIAL_BRIEF)
    assert refused.status_code == 403 and "reviewer role" in refused.text
    assert vic.post_form("/runs/start", {"sha256": "0" * 64}).status_code == 403
    assert vic.post_form("/runs/1/cancel").status_code == 403
    assert vic.post_form("/runs/1/rerun").status_code == 403
    rita = Browser(app, "rita")
    assert 'id="new-run"' in rita.get("/runs").text
    assert rita.get("/runs/new").status_code == 200


def test_every_form_needs_the_csrf_token(site: tuple[World, FastAPI]) -> None:
    _, app = site
    rita = Browser(app, "rita")
    for response in (upload(rita, PARTIAL_BRIEF, csrf=False),
                     rita.post_form("/runs/start", {"sha256": "0" * 64}, token=None),
                     rita.post_form("/runs/start", {"sha256": "0" * 64}, token="forged"),
                     rita.post_form("/runs/1/cancel", token=None),
                     rita.post_form("/runs/1/rerun", token=None),
                     rita.post_form("/tokens", {"name": "x", "scope": "read"}, token=None),
                     rita.post_form("/tokens/1/revoke", token="forged")):
        assert response.status_code == 403, response.text
        assert "CSRF" in response.text
    assert list_tokens(app.state.db) == []


# ------------------------------------------------------------------------------------------------ upload, start, run


def test_a_rejected_brief_shows_its_problems_and_cannot_start(site: tuple[World, FastAPI]) -> None:
    _, app = site
    rita = Browser(app, "rita")
    page = upload(rita, BAD_BRIEF, "bad.csv")
    assert page.status_code == 422
    rows = problem_rows(page.text)
    assert rows[:3] == [
        ("2", "channels", "unknown channel &#39;tv&#39; (known: banner, instagram_portrait, instagram_square, "
                          "leaderboard, print_a4, skyscraper, story)"),
        ("3", "subject", "required value is empty"),
        ("3", "variants", "&#39;abc&#39; is not a whole number"),
    ]
    assert 'id="brief-rejected"' in page.text and 'id="start-form"' not in page.text
    assert "/tmp/" not in page.text  # the file is named as uploaded, never by a server folder
    # Start without a pending upload: refused, nothing submitted.
    assert rita.post_form("/runs/start", {"sha256": "a" * 64}).status_code == 409
    assert [e for e in audit_entries(app.state.db) if e.action == "submission.created"] == []


def test_not_a_brief_and_a_bad_option_are_one_clear_line(site: tuple[World, FastAPI]) -> None:
    _, app = site
    rita = Browser(app, "rita")
    page = upload(rita, b"\x89PNG\r\n", "logo.png")
    assert page.status_code == 422 and ".csv or .xlsx" in page.text
    page = upload(rita, PARTIAL_BRIEF, "brief.csv", steps="9000")
    assert page.status_code == 422 and "option &#39;steps&#39;" in page.text


def test_partial_brief_starts_skips_its_bad_row_and_renders(site: tuple[World, FastAPI]) -> None:
    world, app = site
    rita = Browser(app, "rita")
    page = upload(rita, PARTIAL_BRIEF, '..\\..\\etc\\tiny "spring".csv', steps="2")
    assert page.status_code == 200, page.text
    assert 'id="brief-skips"' in page.text
    assert problem_rows(page.text)[0][:2] == ("2", "channels")
    assert re.search(r'<p id="plan-summary"><strong>2</strong> image\(s\) from 2 row\(s\)', page.text)
    assert "local worker on this machine" in page.text
    started = rita.post_form("/runs/start", {"sha256": start_form_hash(page.text)})
    assert started.status_code == 303, started.text
    run_url = started.headers["location"]
    sub_id = int(run_url.rsplit("/", 1)[1])
    assert run_url == f"/runs/{sub_id}"
    # The same form again (a double click, a reload): the upload was used, nothing more starts.
    assert rita.post_form("/runs/start", {"sha256": start_form_hash(page.text)}).status_code == 409

    brief = rita.get(f"{run_url}/brief")
    assert brief.status_code == 200 and brief.content == PARTIAL_BRIEF
    disposition = brief.headers["content-disposition"]
    assert disposition.startswith("attachment;") and re.fullmatch(r'attachment; filename="[A-Za-z0-9._-]+\.csv"', disposition)

    done = wait_terminal(app, sub_id)
    assert done["status"] == "completed", done
    assert done["counts"]["done"] == 2
    run_page = rita.get(run_url)
    assert run_page.status_code == 200
    assert re.search(r'id="run-status">completed<', run_page.text)
    assert len(re.findall(r'class="run-thumb"', run_page.text)) == 2
    assert re.findall(r'<img src="/thumbs/(\d+)\?w=160"', run_page.text)
    assert 'id="run-problems"' in run_page.text and "unknown channel" in run_page.text  # the skipped row
    assert 'href="/campaigns/' in run_page.text and "tiny-spring" in run_page.text
    assert 'id="cancel-form" class="inline" hidden' in run_page.text

    listing = rita.get("/runs")
    assert f'id="run-row-{sub_id}"' in listing.text and "rita" in listing.text
    # build_world's run is a runs row no submission started: listed as a CLI run.
    assert 'data-cli-run-id="1"' in listing.text and "CLI" in listing.text
    created = [e for e in audit_entries(app.state.db) if e.action == "submission.created"]
    assert [(e.actor, e.entity_id) for e in created] == [("rita", str(sub_id))]
    assert world.campaign_id  # the world's own campaign is untouched beside the new one


def test_cancel_then_run_the_rest(site: tuple[World, FastAPI]) -> None:
    _, app = site
    rita = Browser(app, "rita")
    page = upload(rita, PARTIAL_BRIEF, "tiny.csv", steps="2")
    sub_id = int(rita.post_form("/runs/start", {"sha256": start_form_hash(page.text)}).headers["location"].rsplit("/", 1)[1])
    refused = rita.post_form(f"/runs/{sub_id}/rerun")  # not while it runs
    assert refused.status_code == 303 and "still" in rita.get(f"/runs/{sub_id}").text
    assert rita.post_form(f"/runs/{sub_id}/cancel").status_code == 303
    run_page = rita.get(f"/runs/{sub_id}").text
    assert 'id="run-status">cancelled<' in run_page and 'id="run-cancelled-by">rita' in run_page
    assert re.search(r'id="rerun-form" class="inline">\s*<input[^>]*>\s*<button type="submit" id="rerun-button">Run the rest<',
                     run_page)
    assert "already finished" not in run_page
    again = rita.post_form(f"/runs/{sub_id}/cancel")  # a second cancel: said on the page, nothing else happens
    assert again.status_code == 303 and "has finished (cancelled)" in rita.get(f"/runs/{sub_id}").text

    rest = rita.post_form(f"/runs/{sub_id}/rerun")
    assert rest.status_code == 303
    new_id = int(rest.headers["location"].rsplit("/", 1)[1])
    assert new_id != sub_id
    done = wait_terminal(app, new_id)
    assert done["status"] == "completed" and done["counts"]["done"] + done["counts"]["skipped"] == 2, done
    actions = [(e.actor, e.action, e.entity_id) for e in audit_entries(app.state.db)
               if e.action in ("submission.created", "submission.cancelled")]
    assert actions == [("rita", "submission.created", str(sub_id)), ("rita", "submission.cancelled", str(sub_id)),
                       ("rita", "submission.created", str(new_id))]


def test_run_pages_404_for_unknown_runs(site: tuple[World, FastAPI]) -> None:
    _, app = site
    rita = Browser(app, "rita")
    assert rita.get("/runs/999").status_code == 404
    assert rita.get("/runs/999/brief").status_code == 404
    assert rita.post_form("/runs/999/cancel").status_code == 404
    assert rita.get("/runs/abc").status_code == 404


# ------------------------------------------------------------------------------------------------ API tokens


def test_token_page_create_show_once_and_revoke(site: tuple[World, FastAPI]) -> None:
    _, app = site
    rita = Browser(app, "rita")
    assert 'id="no-tokens"' in rita.get("/tokens").text
    created = rita.post_form("/tokens", {"name": "dam-connector", "scope": "submit"})
    assert created.status_code == 201
    assert created.headers["cache-control"] == "no-store"
    token = re.search(r'id="new-token" class="token-text" value="(adf_[A-Za-z0-9_-]+)"', created.text).group(1)
    me = TestClient(app).get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})  # no session: the token alone
    assert me.status_code == 200 and me.json()["name"] == "rita"
    listing = rita.get("/tokens").text
    assert token not in listing  # shown once
    info = list_tokens(app.state.db, user_name="rita")[0]
    assert info.name == "dam-connector" and set(info.scopes) == {"read", "submit"} and f"{info.prefix}…" in listing

    # A viewer: read tokens only, and cannot touch rita's.
    vic = Browser(app, "vic")
    page = vic.get("/tokens").text
    assert 'value="submit"' not in page and "dam-connector" not in page
    refused = vic.post_form("/tokens", {"name": "mine", "scope": "submit"})
    assert refused.status_code == 403 and 'id="token-error"' in refused.text
    assert vic.post_form("/tokens", {"name": "mine", "scope": "read"}).status_code == 201
    assert vic.post_form(f"/tokens/{info.id}/revoke").status_code == 404
    assert rita.post_form("/tokens", {"name": "x", "scope": "admin"}).status_code == 400

    # An admin sees everyone's and revokes rita's.
    ada = Browser(app, "ada")
    page = ada.get("/tokens").text
    assert "dam-connector" in page and "mine" in page and "<th scope=\"col\">User</th>" in page
    revoked = ada.post_form(f"/tokens/{info.id}/revoke")
    assert revoked.status_code == 303 and revoked.headers["location"] == "/tokens"
    assert f'id="token-{info.id}" data-token-id="{info.id}" data-revoked="1"' in ada.get("/tokens").text
    after = TestClient(app).get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert after.status_code == 401
    actions = [(e.actor, e.action) for e in audit_entries(app.state.db) if e.action.startswith("token.")]
    assert actions == [("rita", "token.created"), ("vic", "token.created"), ("ada", "token.revoked")]

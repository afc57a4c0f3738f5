"""Runs from the browser, in real Chromium (Playwright, as tests/review/test_gallery_browser.py): a bad brief dropped
on the new-run page -> the problem table with rows and columns; the example brief -> its plan -> Start -> the run
page's live progress reaches done with its thumbnails -> the new variants in the campaign's gallery; a run cancelled
mid-way -> cancelled, its worker gone. The runs are real: the local worker (``python -m cli run``) renders the
example brief with the bundled model; the run to cancel asks for 150 steps per image, so it is still rendering.

Screenshots go to ``$ADFORGE_TEST_ARTIFACTS/runs-browser/<test>/`` (default: a pytest temporary folder).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from review.run_launcher import process_alive
from review.submissions import get_submission
from tests.review.runs_site import BAD_BRIEF, EXAMPLE_BRIEF, runs_site, stop_runs
from tests.review.test_gallery_browser import Tab, browser, open_tab, screenshots_folder  # noqa: F401  (browser: the module's Chromium)
from tests.review.world import World, audit_entries, serve_app

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")

RUN_TIMEOUT_S = 300  # the example brief: about half a minute on a quiet 2-core CPU; a busy one is slower


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshots_folder(tmp_path_factory, "runs-browser")


@pytest.fixture
def tab(browser: Any, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Tab]:  # noqa: F811
    """confirm() dialogs (the Cancel button's) are accepted and recorded."""
    yield from open_tab(browser, artifacts, request, accept_confirm=True)


@pytest.fixture
def live(tmp_path: Path, tab: Tab, prefect_harness: str,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[World, FastAPI]]:
    """The gallery over a world, on 127.0.0.1, able to start real runs of the bundled model; ``tab`` points at it."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)  # the workers use the session's Prefect server
    monkeypatch.setenv("ADFORGE_THREADS", "1")
    world, app, db = runs_site(tmp_path)
    server, thread, port = serve_app(app)
    tab.base = f"http://127.0.0.1:{port}"
    try:
        yield world, app
    finally:
        stop_runs(app)
        server.should_exit = True
        thread.join(timeout=15)
        db.dispose()


def until(tab: Tab, expression: str, timeout_s: float) -> None:
    """Tab.until with a longer limit (a run, not a page)."""
    deadline = time.monotonic() + timeout_s
    while not tab.page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout_s} s: {expression}")
        time.sleep(0.2)


def thumbs_loaded(tab: Tab) -> list[int]:
    """naturalWidth of every thumbnail on the run page (0: not loaded or broken)."""
    return tab.page.evaluate("Array.from(document.querySelectorAll('#run-thumbs img'))"
                             ".map(i => i.complete ? i.naturalWidth : 0)")


def upload(tab: Tab, path: Path, steps: str | None = None) -> None:
    if steps:
        tab.page.fill("#opt-steps", steps)
    tab.page.set_input_files("#brief-file", str(path))
    tab.page.click("#brief-check")
    tab.page.wait_for_selector("#check-result")


def start(tab: Tab) -> int:
    tab.page.click("#start-button")
    tab.page.wait_for_url(re.compile(re.escape(tab.base) + r"/runs/\d+$"))
    return int(tab.page.url.rsplit("/", 1)[1])


# ------------------------------------------------------------------------------------------------ the tests


def test_a_bad_brief_dropped_on_the_page_shows_the_problem_table(tab: Tab, live: tuple[World, FastAPI]) -> None:
    from playwright.sync_api import expect

    tab.page.set_viewport_size({"width": 390, "height": 844})  # a phone
    tab.sign_in("rita", "/runs/new")
    expect(tab.page.locator("#dropzone")).to_be_visible()
    tab.shot("new-run-phone")
    # A real drop: a DataTransfer holding the file, dispatched on the zone as the browser does for a dragged file.
    with tab.page.expect_navigation():
        tab.page.evaluate("""(text) => {
            const dt = new DataTransfer();
            dt.items.add(new File([text], "bad.csv", {type: "text/csv"}));
            const drop = new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
            document.getElementById("dropzone").dispatchEvent(drop);
        }""", BAD_BRIEF.decode())
    rows = tab.page.locator("#problems tr.problem")
    expect(rows).to_have_count(4)
    expect(rows.nth(0)).to_have_attribute("data-line", "2")
    expect(rows.nth(0)).to_have_attribute("data-column", "channels")
    expect(rows.nth(0).locator(".message")).to_contain_text("unknown channel 'tv'")
    expect(rows.nth(1)).to_have_attribute("data-line", "3")
    expect(rows.nth(1).locator(".column")).to_have_text("subject")
    expect(rows.nth(2).locator(".column")).to_have_text("variants")
    expect(tab.page.locator("#brief-rejected")).to_be_visible()
    expect(tab.page.locator("#start-button")).to_have_count(0)
    expect(tab.page.locator("#check-result h2")).to_have_text("bad.csv")
    tab.shot("bad-brief-phone")
    tab.page.set_viewport_size({"width": 1280, "height": 900})
    tab.shot("bad-brief-desktop")


def test_the_example_brief_runs_to_done_and_lands_in_the_gallery(tab: Tab, live: tuple[World, FastAPI]) -> None:
    from playwright.sync_api import expect

    _, app = live
    tab.sign_in("rita", "/runs")
    tab.page.click("#new-run")
    tab.page.wait_for_url(re.compile(r".*/runs/new$"))
    upload(tab, EXAMPLE_BRIEF)
    expect(tab.page.locator("#plan-summary")).to_contain_text("24 image(s) from 4 row(s)")
    expect(tab.page.locator("#plan-backend")).to_contain_text("local worker on this machine")
    expect(tab.page.locator("#plan-groups tr.plan-group")).to_have_count(8)
    expect(tab.page.locator("#plan-groups")).to_contain_text("adforge-demo")
    expect(tab.page.locator("#plan-estimate")).to_contain_text("Estimated device time")
    expect(tab.page.locator("#problems")).to_have_count(0)
    tab.shot("plan")
    sub_id = start(tab)
    expect(tab.page.locator("#run-backend")).to_contain_text("local worker on this machine")
    expect(tab.page.locator("#run-submitted-by")).to_have_text("rita")
    tab.shot("run-started")
    # Thumbnails arrive while the run is still going (the page polls the run's JSON), not only at the end.
    until(tab, "document.querySelectorAll('#run-thumbs .run-thumb').length > 0"
               " || document.getElementById('run').dataset.live === 'done'", RUN_TIMEOUT_S)
    assert tab.page.evaluate("document.getElementById('run').dataset.live") == "polling"
    tab.shot("run-progress")
    until(tab, "document.getElementById('run').dataset.live === 'done'", RUN_TIMEOUT_S)
    expect(tab.page.locator("#run-status")).to_have_text("completed")
    expect(tab.page.locator('[data-field="done"]')).to_have_text("24")
    expect(tab.page.locator('[data-field="failed"]')).to_have_text("0")
    assert tab.page.evaluate("document.getElementById('run-progress').value") == 1
    expect(tab.page.locator("#run-thumbs .run-thumb")).to_have_count(24)
    until(tab, "Array.from(document.querySelectorAll('#run-thumbs img')).every(i => i.complete)", 30)
    assert all(w > 0 for w in thumbs_loaded(tab)), thumbs_loaded(tab)
    expect(tab.page.locator("#cancel-form")).to_be_hidden()
    expect(tab.page.locator("#rerun-form")).to_be_hidden()
    tab.shot("run-done")
    sub = get_submission(app.state, sub_id)
    assert sub is not None and sub["status"] == "completed" and sub["counts"]["done"] == 24

    # A reload renders the finished run from the server alone (no polling), with the campaign's gallery link.
    tab.page.reload()
    expect(tab.page.locator("#run-thumbs .run-thumb")).to_have_count(24)
    assert tab.page.evaluate("document.getElementById('run').dataset.live") == "done"
    expect(tab.page.locator("#run-campaigns")).to_contain_text("spring-launch-2025")
    tab.page.click("#run-campaigns a.campaign-link")
    tab.wait_ready()
    expect(tab.page.locator("#gallery .card")).to_have_count(24)
    tab.shot("gallery")

    tab.goto("/runs")
    row = tab.page.locator(f"#run-row-{sub_id}")
    expect(row).to_have_attribute("data-status", "completed")
    expect(row).to_contain_text("spring-launch.csv")
    expect(tab.page.locator("#cli-run-list")).to_contain_text("CLI")
    tab.shot("runs-list")
    with tab.page.expect_download() as info:
        row.locator("a[download]").click()
    assert info.value.suggested_filename == "spring-launch.csv"
    assert Path(info.value.path()).read_bytes() == EXAMPLE_BRIEF.read_bytes()


def test_cancel_mid_run(tab: Tab, live: tuple[World, FastAPI]) -> None:
    from playwright.sync_api import expect

    _, app = live
    tab.sign_in("rita", "/runs/new")
    upload(tab, EXAMPLE_BRIEF, steps="150")  # six times the default work per image: still running when cancelled
    expect(tab.page.locator("#plan-summary")).to_contain_text("150 steps")
    sub_id = start(tab)
    # Mid-run: the first images have landed (and shown up on the page), the rest are still rendering.
    until(tab, "document.querySelectorAll('#run-thumbs .run-thumb').length > 0", RUN_TIMEOUT_S)
    pid = (get_submission(app.state, sub_id) or {}).get("pid")
    tab.shot("before-cancel")
    tab.page.click("#cancel-button")
    expect(tab.page.locator("#run-status")).to_have_text("cancelled")
    assert tab.dialogs and tab.dialogs[0].startswith("confirm: Cancel run")
    expect(tab.page.locator("#run-cancelled-by")).to_contain_text("rita")
    expect(tab.page.locator("#cancel-form")).to_be_hidden()
    expect(tab.page.locator("#rerun-button")).to_have_text("Run the rest")
    tab.shot("cancelled")
    sub = get_submission(app.state, sub_id) or {}
    assert sub["status"] == "cancelled" and 0 < sub["counts"]["done"] < 24, sub
    expect(tab.page.locator("#run-progress")).not_to_have_attribute("value", "1")
    if pid is not None:
        assert not process_alive(pid)
    assert [e.actor for e in audit_entries(app.state.db) if e.action == "submission.cancelled"] == ["rita"]
    tab.goto("/runs")
    expect(tab.page.locator(f"#run-row-{sub_id}")).to_have_attribute("data-status", "cancelled")


def test_viewer_sees_runs_but_no_new_run_or_cancel(tab: Tab, live: tuple[World, FastAPI]) -> None:
    from playwright.sync_api import expect

    tab.sign_in("vic", "/runs")
    expect(tab.page.locator("#nav-runs")).to_be_visible()
    expect(tab.page.locator("#new-run")).to_have_count(0)
    response = tab.goto("/runs/new")
    assert response is not None and response.status == 403
    tab.goto("/tokens")
    expect(tab.page.locator("#token-scope option")).to_have_count(1)
    tab.page.fill("#token-name", "reporting")
    tab.page.click("#token-create")
    expect(tab.page.locator("#new-token")).to_have_value(re.compile(r"^adf_[A-Za-z0-9_-]{40,}$"))
    tab.shot("token-created")

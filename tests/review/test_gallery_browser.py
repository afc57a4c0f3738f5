"""The review gallery in a real browser: Playwright driving Debian's headless Chromium against the gallery served by
uvicorn on 127.0.0.1 (a free port), over a world from ``tests.review.world`` (SQLite and a local asset store; the
API tests cover PostgreSQL and S3).

Sign-in through the form, keyboard review on a row/channel grid (DOM, database and audit log), readiness, compare,
export download, results upload, the viewer role, and a prompt holding ``<script>``. Screenshots go to
``$ADFORGE_TEST_ARTIFACTS/gallery-browser/<test>/`` (default: a pytest temporary folder; the path is printed and
recorded as the ``screenshots`` property of each test).

Needs ``/usr/bin/chromium`` (Debian's package ``chromium``, which ``.ci/run`` installs; ``ADFORGE_CHROMIUM`` points
elsewhere) and the ``playwright`` wheel (the ``test`` extra). Without them the tests skip, except under ``CI``,
where they fail.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import select

from review.actions import ReviewChange, apply_review
from review.app import create_app
from storage.assets import open_store
from storage.database import open_database, sqlite_url
from storage.review_schema import ABResult, ExportRecord, ReviewState
from tests.review.world import PASSWORD, World, audit_entries, build_world, serve_app

CHROMIUM = Path(os.environ.get("ADFORGE_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps opening connections that this closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCRIPT_PROMPT = '<script>alert("pwned")</script> a red bicycle & "quotes"'
XSS_ROW = '<img src=x onerror="alert(1)">'
TIMEOUT_MS = 15_000  # a 2-core machine with a training job beside us: generous, auto-retrying waits

# Every test signs users in; the server runs in this process, so it hashes cheaply too.
pytestmark = pytest.mark.usefixtures("cheap_password_hashes")


# ------------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def browser(service_missing: Callable[[str], None]) -> Iterator[Any]:
    """One headless Chromium for the module (each test gets its own context: cookies, downloads)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        service_missing(f"Chromium at {CHROMIUM} (Debian package `chromium`; .ci/run installs it)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        service_missing(f"playwright ({exc}; pip install -e '.[test]')")
    expect.set_options(timeout=TIMEOUT_MS)
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    except Exception as exc:  # a broken install: the wrapper script without its libraries, and the like
        pw.stop()
        service_missing(f"a working Chromium at {CHROMIUM} ({type(exc).__name__}: {exc})")
    try:
        yield chromium
    finally:
        chromium.close()
        pw.stop()


def screenshots_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a browser test module's screenshots go: under ADFORGE_TEST_ARTIFACTS when set (CI keeps them)."""
    root = os.environ.get("ADFORGE_TEST_ARTIFACTS")
    path = Path(root) / name if root else tmp_path_factory.mktemp(name)
    path.mkdir(parents=True, exist_ok=True)
    print(f"\n{name.replace('-', ' ')} screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshots_folder(tmp_path_factory, "gallery-browser")


@dataclass
class Tab:
    """A page in a fresh browser context, with what the page did that no test wants."""

    page: Any
    base: str
    folder: Path
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # uncaught script errors, CSP violations

    def shot(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def sign_in(self, name: str, next_path: str = "/") -> None:
        """Through the login form, as a person does."""
        self.goto(f"/login?next={quote(next_path, safe='/')}")
        self.page.fill("#login-name", name)
        self.page.fill("#login-password", PASSWORD)
        self.page.click("#login-submit")
        self.page.wait_for_url(re.compile(re.escape(self.base + next_path.split("?")[0])))
        assert self.page.get_attribute("#current-user", "data-user") == name

    def gallery(self, path: str) -> None:
        self.goto(path)
        self.wait_ready()

    def wait_ready(self) -> None:
        self.until("document.body.dataset.galleryReady === '1'")

    def until(self, expression: str) -> None:
        """Poll a JavaScript expression until it is true. (Playwright's wait_for_function evaluates its predicate with
        eval() inside the page, which the gallery's CSP forbids; evaluate() over the DevTools protocol is exempt.)"""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not self.page.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {TIMEOUT_MS} ms: {expression}")
            time.sleep(0.05)

    def focused_id(self) -> str | None:
        return self.page.evaluate("document.activeElement && document.activeElement.id")


def open_tab(browser: Any, artifacts: Path, request: pytest.FixtureRequest, *, accept_confirm: bool = False) -> Iterator[Tab]:
    """A page in a fresh context whose dialogs are recorded (confirm() accepted when ``accept_confirm``, else
    dismissed), page errors and CSP violations collected and asserted absent, and a screenshot kept on failure."""
    context = browser.new_context(viewport={"width": 600, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    folder = artifacts / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    t = Tab(page, "", folder)
    request.node.user_properties.append(("screenshots", str(folder)))

    def on_dialog(dialog: Any) -> None:
        t.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept() if accept_confirm and dialog.type == "confirm" else dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: t.errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: t.errors.append(f"console: {msg.text}")
            if msg.type == "error" and "Content Security Policy" in msg.text else None)
    failed_before = request.session.testsfailed
    try:
        yield t
        if request.session.testsfailed > failed_before and t.base:  # the call failed: keep what the page showed
            try:
                t.shot("at-failure")
            except Exception as exc:  # a crashed page must not hide the test's own failure
                print(f"no failure screenshot: {exc}")
    finally:
        context.close()
    assert t.errors == [], t.errors


@pytest.fixture
def tab(browser: Any, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Tab]:
    yield from open_tab(browser, artifacts, request)


# ------------------------------------------------------------------------------------------------ the live gallery


@dataclass
class Live:
    world: World
    base: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def serve(tmp_path: Path, tab: Tab) -> Iterator[Callable[..., Live]]:
    """``serve(**build_world kwargs)``: a fresh world and the gallery over it, on 127.0.0.1; ``tab`` points at it."""
    started: list[Live] = []
    opened: list[Any] = []

    def start(**world_kw: Any) -> Live:
        url = sqlite_url(tmp_path / "adforge.db")
        store_url = str(tmp_path / "assets")
        db = open_database(url)
        opened.append(db)
        world = build_world(db, open_store(store_url), store_url, **world_kw)
        app = create_app(url, store_url, secret_key="browser-test-secret", cache_dir=tmp_path / "thumbs")
        server, thread, port = serve_app(app)
        live = Live(world, f"http://127.0.0.1:{port}", server, thread)
        started.append(live)
        tab.base = live.base
        return live

    try:
        yield start
    finally:
        for live in started:
            live.stop()
        for db in opened:
            db.dispose()


# ------------------------------------------------------------------------------------------------ helpers


def states(world: World) -> dict[int, tuple[str, bool, str | None]]:
    with world.db.session() as s:
        return {r.variant_id: (r.status, r.starred, r.ab_group) for r in s.scalars(select(ReviewState))}


def review_actions(world: World, variant_id: int) -> list[tuple[str, str]]:
    return [(e.actor, e.action) for e in audit_entries(world.db, entity="variant", entity_id=str(variant_id))
            if e.action.startswith("review.")]


def card(tab: Tab, variant_id: int) -> Any:
    return tab.page.locator(f"#variant-{variant_id}")


def expect_card(tab: Tab, variant_id: int, *, status: str, starred: str = "0", group: str = "") -> None:
    from playwright.sync_api import expect

    c = card(tab, variant_id)
    expect(c).to_have_attribute("data-status", status)
    expect(c).to_have_attribute("data-starred", starred)
    expect(c).to_have_attribute("data-group", group)
    expect(c.locator('[data-field="status"]')).to_have_text(status)
    expect(c.locator('[data-field="group"]')).to_have_text(group)
    expect(c.locator('[data-field="starred"]')).to_have_text("\u2605" if starred == "1" else "")


def seed_reviews(world: World, changes: dict[int, dict[str, Any]]) -> None:
    """Review state set up without the browser (for tests about what comes after review)."""
    for vid, change in changes.items():
        apply_review(world.db, vid, ReviewChange(**change), actor="rita")


def download_export(tab: Tab, campaign_id: int, target: Path) -> tuple[str, zipfile.ZipFile]:
    tab.goto(f"/campaigns/{campaign_id}")
    assert tab.page.is_checked("#export-approved")
    with tab.page.expect_download() as info:
        tab.page.click("#export-button")
    download = info.value
    assert download.failure() is None
    download.save_as(target)
    return download.suggested_filename, zipfile.ZipFile(target)


# ------------------------------------------------------------------------------------------------ sign-in


def test_sign_in_through_the_login_form(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    live = serve()
    w = live.world
    grid_path = f"/campaigns/{w.campaign_id}/gallery"
    page = tab.page
    tab.goto(grid_path)  # not signed in: the sign-in page, which sends us back here afterwards
    page.wait_for_url(re.compile(r"/login\?next=/campaigns/"))
    expect(page.locator("#login-name")).to_be_focused()
    assert page.input_value('input[name="next"]') == grid_path
    tab.shot("01-login")

    page.fill("#login-name", "rita")
    page.fill("#login-password", "not the password")
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
        page.click("#login-submit")
    assert answer.value.status == 401
    expect(page.locator("#login-error")).to_have_text("Wrong name or password.")
    expect(page.locator("#login-name")).to_have_value("rita")
    tab.shot("02-wrong-password")

    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(live.base + grid_path)
    tab.wait_ready()
    expect(page.locator("#current-user")).to_have_attribute("data-user", "rita")
    assert page.evaluate("[document.body.dataset.role, document.body.dataset.canReview]") == ["reviewer", "1"]
    expect(page.locator("#gallery .card")).to_have_count(12)
    # Thumbnails come through the session and the page's CSP: every image decodes.
    tab.until("Array.from(document.querySelectorAll('#gallery img.thumb')).filter(i => i.loading !== 'lazy' || i.getBoundingClientRect().top"
                           " < innerHeight).every(i => i.complete && i.naturalWidth > 0)")
    tab.shot("03-signed-in-grid")
    assert [(e.actor, e.action) for e in audit_entries(w.db, action="user.signed_in")] == [("rita", "user.signed_in")]

    page.click("#logout-button")
    page.wait_for_url(re.compile(r"/login$"))
    tab.goto(grid_path)
    page.wait_for_url(re.compile(r"/login\?next="))


# ------------------------------------------------------------------------------------------------ keyboard review


def test_keyboard_review_on_a_row_channel_grid(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    live = serve(per_channel=6)
    w = live.world
    row = w.rows["hero-01"]
    v = w.variants[("hero-01", "instagram_square")]
    grid_path = f"/campaigns/{w.campaign_id}/gallery?row={row}&channel=instagram_square"
    tab.sign_in("rita", grid_path)
    tab.wait_ready()
    page, kb = tab.page, tab.page.keyboard
    expect(page.locator("#gallery .card")).to_have_count(6)
    badge = page.locator(f"#section-{row}-instagram_square .readiness")
    expect(badge).to_have_attribute("data-ready", "0")
    expect(badge).to_have_text("0/2 approved")

    # Arrows move the focus; up and down follow the layout (a 600 px window shows 3 columns).
    columns = page.evaluate("(() => { const c = document.querySelectorAll('#gallery .card');"
                            " return Array.from(c).filter(x => x.offsetTop === c[0].offsetTop).length; })()")
    assert columns == 3
    kb.press("ArrowRight")
    assert tab.focused_id() == f"variant-{v[0]}"
    kb.press("ArrowRight")
    assert tab.focused_id() == f"variant-{v[1]}"
    kb.press("ArrowLeft")
    assert tab.focused_id() == f"variant-{v[0]}"
    kb.press("ArrowDown")
    assert tab.focused_id() == f"variant-{v[3]}"
    kb.press("ArrowUp")
    assert tab.focused_id() == f"variant-{v[0]}"

    # v0: approve, group A, star.
    kb.press("a")
    expect_card(tab, v[0], status="approved")
    expect(badge).to_have_text("1/2 approved")
    expect(badge).to_have_attribute("data-ready", "0")
    kb.press("1")
    expect_card(tab, v[0], status="approved", group="A")
    kb.press("s")
    expect_card(tab, v[0], status="approved", starred="1", group="A")
    # v1: approve, group B: the second approval makes the row and channel ready.
    kb.press("ArrowRight")
    kb.press("a")
    kb.press("2")
    expect_card(tab, v[1], status="approved", group="B")
    expect(badge).to_have_attribute("data-ready", "1")
    expect(badge).to_have_class(re.compile(r"\bready\b"))
    expect(badge).to_have_text("2/2 approved \u00b7 ready")
    tab.shot("01-two-approved-ready")
    # v2: reject. v3: approve then reject at once: the changes go out in order, so it ends rejected.
    kb.press("ArrowRight")
    kb.press("r")
    expect_card(tab, v[2], status="rejected")
    kb.press("ArrowDown")
    assert tab.focused_id() == f"variant-{v[5]}"
    kb.press("ArrowLeft")
    kb.press("ArrowLeft")
    assert tab.focused_id() == f"variant-{v[3]}"
    kb.press("a")
    kb.press("r")
    expect_card(tab, v[3], status="rejected")
    # v4: group A, then 1 again takes it out; star twice is no star.
    kb.press("ArrowRight")
    kb.press("1")
    expect_card(tab, v[4], status="pending", group="A")
    kb.press("1")
    kb.press("s")
    kb.press("s")
    expect_card(tab, v[4], status="pending")
    tab.until("document.querySelectorAll('#gallery .card.busy').length === 0")
    tab.shot("02-after-keys")

    # The database holds the same, and every change has its audit entry by rita.
    assert states(w) == {v[0]: ("approved", True, "A"), v[1]: ("approved", False, "B"), v[2]: ("rejected", False, None),
                         v[3]: ("rejected", False, None), v[4]: ("pending", False, None)}
    r = ("rita",)
    assert review_actions(w, v[0]) == [r + ("review.approved",), r + ("review.grouped",), r + ("review.starred",)]
    assert review_actions(w, v[1]) == [r + ("review.approved",), r + ("review.grouped",)]
    assert review_actions(w, v[2]) == [r + ("review.rejected",)]
    assert review_actions(w, v[3]) == [r + ("review.approved",), r + ("review.rejected",)]
    assert review_actions(w, v[4]) == [r + ("review.grouped",), r + ("review.ungrouped",), r + ("review.starred",),
                                       r + ("review.unstarred",)]
    assert review_actions(w, v[5]) == []
    entry = audit_entries(w.db, entity="variant", entity_id=str(v[1]), action="review.grouped")[0]
    assert entry.before == {"status": "approved", "starred": False, "group": None}
    assert entry.after["group"] == "B" and entry.after["channel"] == "instagram_square" and entry.after["row_id"] == row

    # A reload shows the server's state: the same attributes, the same badge.
    page.reload()
    tab.wait_ready()
    expect_card(tab, v[0], status="approved", starred="1", group="A")
    expect_card(tab, v[3], status="rejected")
    expect(badge).to_have_attribute("data-ready", "1")
    # The campaign overview agrees: this channel of the row is ready, the row (leaderboard pending) is not.
    tab.goto(f"/campaigns/{w.campaign_id}")
    expect(page.locator(f'#row-{row} .readiness[data-channel="instagram_square"]')).to_have_attribute("data-ready", "1")
    expect(page.locator(f'#row-{row} .readiness[data-channel="leaderboard"]')).to_have_attribute("data-ready", "0")
    expect(page.locator(f"#row-{row}")).to_have_attribute("data-ready", "0")
    tab.shot("03-campaign-overview")


def test_help_escape_and_buttons_keep_their_keys(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    live = serve()
    w = live.world
    v = w.variants[("hero-01", "instagram_square")]
    tab.sign_in("rita", f"/campaigns/{w.campaign_id}/gallery")
    tab.wait_ready()
    page, kb = tab.page, tab.page.keyboard
    help_box, panel = page.locator("#keyboard-help"), page.locator("#detail-panel")
    kb.press("?")
    expect(help_box).to_be_visible()
    kb.press("Escape")
    expect(help_box).to_be_hidden()

    kb.press("ArrowRight")
    kb.press("Enter")  # on a card: its details
    expect(panel).to_be_visible()
    expect(panel.locator('[data-field="seed"]')).to_have_text(str(1000))
    kb.press("ArrowRight")  # the open panel follows the focus
    expect(panel).to_have_attribute("data-variant-id", str(v[1]))
    expect(panel.locator('[data-field="seed"]')).to_have_text(str(1001))
    tab.shot("01-detail-panel")
    kb.press("Escape")
    expect(panel).to_be_hidden()
    assert tab.focused_id() == f"variant-{v[1]}"

    # Enter and Space on a focused button press that button; they do not open a card's details.
    page.focus("#help-button")
    kb.press("Enter")
    expect(help_box).to_be_visible()
    expect(panel).to_be_hidden()
    kb.press(" ")
    expect(help_box).to_be_hidden()
    # Typing in a filter never reviews anything.
    page.focus("#filter-status")
    kb.press("a")
    page.focus("#filter-starred")
    kb.press("r")
    assert states(w) == {}


# ------------------------------------------------------------------------------------------------ compare


def test_compare_two_selected_variants(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    live = serve()
    w = live.world
    v = w.variants[("hero-01", "instagram_square")]
    tab.sign_in("vic", f"/campaigns/{w.campaign_id}/gallery")  # comparing only reads: a viewer may
    tab.wait_ready()
    page, kb = tab.page, tab.page.keyboard
    button, count = page.locator("#compare-button"), page.locator("#compare-count")
    expect(button).to_be_disabled()
    kb.press("c")  # nothing selected yet: a hint, no navigation
    expect(page.locator("#flash")).to_contain_text("Select two or more")

    kb.press("ArrowRight")
    kb.press("x")
    expect(card(tab, v[0])).to_have_class(re.compile(r"\bselected\b"))
    expect(count).to_have_text("1")
    expect(button).to_be_disabled()
    # The card's checkbox selects too, and a second click takes it out again.
    box = card(tab, v[1]).locator(".compare-toggle")
    box.click()
    expect(box).to_be_checked()
    expect(count).to_have_text("2")
    box.click()
    expect(box).not_to_be_checked()
    expect(count).to_have_text("1")
    page.focus(f"#variant-{v[2]}")
    kb.press("x")
    expect(count).to_have_text("2")
    expect(button).to_be_enabled()
    expect(card(tab, v[2]).locator(".compare-toggle")).to_be_checked()
    tab.shot("01-selected")

    kb.press("c")
    page.wait_for_url(f"{live.base}/compare?ids={v[0]},{v[2]}")
    items = page.locator("#compare .compare-item")
    expect(items).to_have_count(2)
    assert [items.nth(i).get_attribute("data-variant-id") for i in range(2)] == [str(v[0]), str(v[2])]
    expect(page.locator('#compare-table tr[data-field="seed"]')).to_have_class(re.compile(r"\bdiffers\b"))
    expect(page.locator('#compare-table tr[data-field="channel"]')).not_to_have_class(re.compile(r"\bdiffers\b"))
    expect(page.locator('#compare-table tr[data-field="seed"] td')).to_have_text(["1000", "1002"])
    tab.until("Array.from(document.querySelectorAll('#compare img')).every(i => i.complete && i.naturalWidth > 0)")
    tab.shot("02-compare")

    # The button does the same as the key.
    tab.gallery(f"/campaigns/{w.campaign_id}/gallery")
    page.locator(f"#variant-{v[1]} .compare-toggle").click()
    page.locator(f"#variant-{w.variants[('hero-02', 'leaderboard')][0]} .compare-toggle").click()
    button.click()
    page.wait_for_url(re.compile(r"/compare\?ids="))
    expect(page.locator('#compare-table tr[data-field="channel"]')).to_have_class(re.compile(r"\bdiffers\b"))


# ------------------------------------------------------------------------------------------------ export and results


def test_export_downloads_the_approved_files(tab: Tab, serve: Callable[..., Live], tmp_path: Path) -> None:
    live = serve()
    w = live.world
    sq, lb = w.variants[("hero-01", "instagram_square")], w.variants[("hero-01", "leaderboard")]
    seed_reviews(w, {sq[0]: {"status": "approved", "group": "A"}, sq[1]: {"status": "approved", "group": "B"},
                     sq[2]: {"status": "rejected"}, lb[1]: {"status": "approved"}})
    tab.sign_in("vic")  # exporting only reads: a viewer may
    tab.goto(f"/campaigns/{w.campaign_id}")
    tab.shot("01-campaign")
    name, zf = download_export(tab, w.campaign_id, tmp_path / "export.zip")
    assert re.fullmatch(r"spring-launch-approved-export\d+\.zip", name)

    manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode("utf-8"))))
    approved = {w.asset_of(x) for x in (sq[0], sq[1], lb[1])}
    assert {int(m["asset_id"]) for m in manifest} == approved
    assert sorted(zf.namelist()) == sorted(["manifest.csv", *(m["file_name"] for m in manifest)])
    for m in manifest:
        assert m["status"] == "approved"
        assert hashlib.sha256(zf.read(m["file_name"])).hexdigest() == m["sha256"]
        assert zf.read(m["file_name"]) == w.store.get(w.keys[int(m["asset_id"])])
    groups = {int(m["asset_id"]): m["group"] for m in manifest}
    assert groups == {w.asset_of(sq[0]): "A", w.asset_of(sq[1]): "B", w.asset_of(lb[1]): ""}
    with w.db.session() as s:
        exports = [(e.created_by, e.file_count, e.approved_only) for e in s.scalars(select(ExportRecord))]
    assert exports == [("vic", 3, True)]
    entry = audit_entries(w.db, action="campaign.exported")[0]
    assert entry.actor == "vic" and sorted(entry.after["asset_ids"]) == sorted(approved)
    tab.shot("02-after-download")  # the download leaves the page where it was


def test_results_upload_names_the_winner(tab: Tab, serve: Callable[..., Live], tmp_path: Path) -> None:
    from playwright.sync_api import expect

    live = serve()
    w = live.world
    sq = w.variants[("hero-01", "instagram_square")]
    seed_reviews(w, {sq[0]: {"status": "approved", "group": "A"}, sq[1]: {"status": "approved", "group": "B"}})
    tab.sign_in("rita")
    _, zf = download_export(tab, w.campaign_id, tmp_path / "export.zip")
    files = {int(m["asset_id"]): m["file_name"] for m in csv.DictReader(io.StringIO(zf.read("manifest.csv").decode()))}
    page = tab.page
    results = f"/campaigns/{w.campaign_id}/results"
    tab.goto(f"/campaigns/{w.campaign_id}")
    page.click("#open-results")
    page.wait_for_url(live.base + results)
    expect(page.locator("#no-results")).to_be_visible()

    # A file with a problem is rejected whole, with the problem listed.
    bad = tmp_path / "bad.csv"
    bad.write_text(f"file_name,impressions,clicks\n{files[w.asset_of(sq[0])]},10,20\nnope.png,5,1\n")
    page.set_input_files("#results-file", str(bad))
    page.click("#results-upload")
    expect(page.locator("#results-problems")).to_be_visible()
    expect(page.locator("#results-problems li")).to_have_count(2)
    tab.shot("01-rejected-file")

    # A: 200 clicks in 1000 impressions, B: 150 in 1000: A wins, p = 0.003256, lift +33.3 %.
    good = tmp_path / "week1.csv"
    good.write_text("File Name,Impressions,Clicks,Conversions\n"
                    f"{files[w.asset_of(sq[0])]},1000,200,20\n{files[w.asset_of(sq[1])]},1000,150,9\n")
    page.set_input_files("#results-file", str(good))
    page.click("#results-upload")
    page.wait_for_url(live.base + results)
    expect(page.locator("#flash")).to_contain_text("Imported results for 2 asset(s); 2 changed.")
    section = page.locator(f"#test-{w.rows['hero-01']}-instagram_square")
    expect(section).to_have_attribute("data-winner", "A")
    expect(section.locator(".winner")).to_have_text("group A wins")
    expect(section.locator(".verdict")).to_contain_text("p = 0.003256")
    expect(section.locator(".verdict")).to_contain_text("lift +33.3% (A vs B)")
    expect(section.locator('tr[data-group="A"] td')).to_have_text(["A", "1", "1000", "200", "20", "20.000%"])
    tab.shot("02-winner")
    page.click('a[href="?metric=conversion"]')
    expect(section.locator(".verdict")).to_contain_text("p = 0.03963")

    with w.db.session() as s:
        stored = {r.asset_id: (r.impressions, r.clicks, r.conversions, r.source, r.imported_by) for r in s.scalars(select(ABResult))}
    assert stored == {w.asset_of(sq[0]): (1000, 200, 20, "week1.csv", "rita"), w.asset_of(sq[1]): (1000, 150, 9, "week1.csv", "rita")}
    assert [e.actor for e in audit_entries(w.db, action="results.imported")] == ["rita", "rita"]


# ------------------------------------------------------------------------------------------------ roles and escaping


def test_a_viewer_cannot_change_anything_from_the_browser(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    live = serve()
    w = live.world
    v = w.variants[("hero-01", "instagram_square")]
    tab.sign_in("vic", f"/campaigns/{w.campaign_id}/gallery")
    tab.wait_ready()
    page, kb = tab.page, tab.page.keyboard
    assert page.evaluate("[document.body.dataset.role, document.body.dataset.canReview]") == ["viewer", "0"]
    kb.press("ArrowRight")
    for key in ("a", "r", "s", "1", "2", "u", "0"):
        kb.press(key)
    expect(page.locator("#flash")).to_contain_text("Your role is read-only.")
    expect_card(tab, v[0], status="pending")
    kb.press("Enter")
    expect(page.locator("#detail-panel")).to_be_visible()
    expect(page.locator("#detail-rerender")).to_be_hidden()
    tab.shot("01-read-only")

    # Past the page's script, the server refuses too: the JSON API, the plain forms, re-render and results.
    token = page.get_attribute('meta[name="csrf-token"]', "content")
    statuses = page.evaluate(
        """async ([vid, cid, token]) => {
            const json = (url, body) => fetch(url, {method: "POST", credentials: "same-origin",
                headers: {"Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": token},
                body: JSON.stringify(body)}).then(r => r.status);
            const form = (url, fields) => { const f = new FormData(); f.append("csrf_token", token);
                for (const [k, v] of Object.entries(fields)) f.append(k, v);
                return fetch(url, {method: "POST", credentials: "same-origin", body: f}).then(r => r.status); };
            return [await json(`/api/variants/${vid}/review`, {status: "approved"}),
                    await json(`/api/variants/${vid}/rerender`, {}),
                    await form(`/variants/${vid}/review`, {status: "approved"}),
                    await form(`/campaigns/${cid}/results`, {file: new Blob(["asset_id,impressions,clicks\\n"])}),
                    await form(`/campaigns/${cid}/settings`, {approvals_needed: "1", confidence: "0.9"})];
        }""", [v[0], w.campaign_id, token])
    assert statuses == [403, 403, 403, 403, 403]
    tab.goto(f"/variants/{v[0]}")
    expect(page.locator("#variant-detail")).to_be_visible()
    expect(page.locator("#review-form")).to_have_count(0)
    tab.goto(f"/campaigns/{w.campaign_id}/results")
    expect(page.locator("#results-form")).to_have_count(0)
    tab.goto(f"/campaigns/{w.campaign_id}")
    expect(page.locator("#settings-form")).to_have_count(0)

    assert states(w) == {}
    assert [e.action for e in audit_entries(w.db) if e.actor == "vic"] == ["user.signed_in"]


def test_a_prompt_with_script_renders_as_text(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    live = serve(prompt=SCRIPT_PROMPT, row_keys=(XSS_ROW, "hero-02"))
    w = live.world
    vid = w.variants[(XSS_ROW, "instagram_square")][0]
    tab.sign_in("rita", f"/campaigns/{w.campaign_id}/gallery")
    tab.wait_ready()
    page = tab.page
    assert card(tab, vid).get_attribute("title") == SCRIPT_PROMPT
    expect(page.locator(f"#section-{w.rows[XSS_ROW]}-instagram_square h2 a")).to_have_text(XSS_ROW)
    page.focus(f"#variant-{vid}")
    page.keyboard.press("Enter")
    panel = page.locator("#detail-panel")
    expect(panel.locator('[data-field="prompt"]')).to_have_text(SCRIPT_PROMPT)
    expect(panel.locator('[data-field="negative_prompt"]')).to_have_text("blurry, <b>bold</b>")
    expect(panel.locator('[data-field="row.key"]')).to_contain_text(XSS_ROW)
    tab.shot("01-gallery-panel")
    # Nothing of the text became markup: the only script is the gallery's, no <b>, no <img src=x>.
    assert page.evaluate("Array.from(document.scripts).map(s => s.getAttribute('src'))") == ["/static/gallery.js"]
    assert page.evaluate("document.querySelectorAll('#main b, img[src=\"x\"]').length") == 0

    tab.goto(f"/variants/{vid}")
    expect(page.locator("#field-prompt")).to_have_text(SCRIPT_PROMPT)
    tab.goto(f"/compare?ids={vid},{w.variants[(XSS_ROW, 'leaderboard')][0]}")
    expect(page.locator("#compare .prompt").first).to_have_text(SCRIPT_PROMPT)
    tab.goto(f"/campaigns/{w.campaign_id}")
    expect(page.locator(f"#row-{w.rows[XSS_ROW]} td a").first).to_have_text(XSS_ROW)
    tab.shot("02-campaign")
    page.wait_for_timeout(200)  # give any stray handler a moment to fire
    assert tab.dialogs == []
    assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 0


# ------------------------------------------------------------------------------------------------ packshots


def test_a_packshot_outline_shows_on_hover_and_a_changed_product_is_flagged(tab: Tab, serve: Callable[..., Live]) -> None:
    from playwright.sync_api import expect

    from storage.schema import Asset

    live = serve()
    w = live.world
    kept, changed = w.variants[("hero-01", "instagram_square")][:2]
    with w.db.session() as s:
        for vid, flag in ((kept, False), (changed, True)):
            asset = s.scalar(select(Asset).where(Asset.variant_id == vid))
            asset.product_error, asset.product_changed = (31.5 if flag else 0.0), flag
            asset.product_outline = "M20 15 L60 15 L60 90 L20 90 Z"
    tab.sign_in("rita", f"/campaigns/{w.campaign_id}/gallery")
    tab.wait_ready()
    visibility = f"getComputedStyle(document.querySelector('#variant-{kept} .product-outline')).visibility"
    assert tab.page.evaluate(visibility) == "hidden"
    card(tab, kept).hover()
    tab.until(f"{visibility} === 'visible'")
    tab.shot("01-outline-on-hover")
    expect(card(tab, changed).locator('[data-field="product-changed"]')).to_have_text("product changed")
    expect(card(tab, kept).locator('[data-field="product-changed"]')).to_have_count(0)


# ------------------------------------------------------------------------------------------------ brand overlays


def test_a_branded_asset_shows_its_clean_picture_and_safe_zones(tab: Tab, serve: Callable[..., Live]) -> None:
    import json

    from playwright.sync_api import expect

    from storage.assets import clean_storage_key
    from storage.schema import Asset, Variant
    from storage.variants import overlay_text
    from tests.review.test_overlay_panel import CLEAN, PIN, RECORD, ZONES

    live = serve()
    w = live.world
    vid = w.variants[("hero-01", "instagram_square")][0]  # 400x400, as RECORD's boxes assume
    with w.db.session() as s:
        s.get(Variant, vid).overlay = overlay_text(PIN)
        asset = s.scalar(select(Asset).where(Asset.variant_id == vid))
        asset.clean_key = w.store.put(clean_storage_key(asset.storage_key), CLEAN, "image/png").key
        asset.overlay = json.dumps(RECORD)
    tab.sign_in("vic", f"/variants/{vid}")
    page = tab.page
    expect(page.locator("#brand-overlay")).to_be_visible()
    expect(page.locator("#view-overlaid figcaption")).to_have_text("With overlay")
    expect(page.locator("#view-clean figcaption")).to_have_text("Clean")
    expect(page.locator("#brand-cta")).to_contain_text("contrast 6.25:1")
    for img in ("#img-overlaid", "#img-clean"):
        tab.until(f"document.querySelector('{img}').complete && document.querySelector('{img}').naturalWidth > 0")
        assert page.evaluate(f"document.querySelector('{img}').naturalWidth") == 400

    visibility = "getComputedStyle(document.querySelector('#safe-zones')).visibility"
    assert page.evaluate(visibility) == "hidden"
    page.check("#safe-zones-toggle")
    tab.until(f"{visibility} === 'visible'")
    # The SVG covers the picture exactly, and its boxes scale with it (the image is shown smaller than its 400 px).
    img, svg, safe = (page.locator(sel).bounding_box() for sel in ("#img-overlaid", "#safe-zones", "#safe-zones .zone-safe"))
    assert all(abs(img[k] - svg[k]) <= 1 for k in ("x", "y", "width", "height")), (img, svg)
    scale = img["width"] / 400
    # (a rect's bounding box includes half its 2px stroke on each side)
    assert abs(safe["x"] - (img["x"] + 20 * scale)) <= 2 and abs(safe["width"] - 360 * scale) <= 3, (img, safe)
    assert page.locator("#safe-zones rect").count() == len(ZONES)
    tab.shot("01-safe-zones")
    if os.environ.get("ADFORGE_SCREENSHOT_DIR"):
        folder = Path(os.environ["ADFORGE_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / "variant-brand-overlay-safe-zones.png"), full_page=True)
    page.uncheck("#safe-zones-toggle")
    tab.until(f"{visibility} === 'hidden'")

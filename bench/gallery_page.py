"""Gallery page speed: a row/channel grid of 500 variants in headless Chromium, against the 2 s target.

Builds a world with ``tests.review.world`` (SQLite, local asset store; ``--variants`` stored variants in one brief
row and channel), serves the gallery with uvicorn on 127.0.0.1, signs in through the form, then opens the grid
page ``--runs`` times, each in a fresh browser context (no browser cache), and reads the browser's own clocks
(Navigation Timing, from navigation start):

* ``DOMContentLoaded``: the HTML parsed and the deferred ``gallery.js`` run;
* ``load``: also the eagerly loaded thumbnails at the top of the grid (and lazy ones already asked for);
* interactive: ``document.body.dataset.galleryReady == "1"``, set when ``gallery.js`` has attached its handlers
  (recorded by a MutationObserver the bench installs before the page's own scripts).

It also waits until every thumbnail in the viewport has decoded ("visible"), and times one ArrowRight + ``a`` until
the card shows the server's answer (the keys really work on that page), once while lazy thumbnails are still
loading and once at network idle. The first visit makes the thumbnails (cold server cache); the others find them
cached; every visit starts with an empty browser cache. As a reference it also times the server-side render of the
same page in this process (FastAPI TestClient, no network, no browser).

``--eager-thumbs 0,40`` compares settings of ``review.pages.EAGER_THUMBS`` (how many thumbnails at the top of the
grid load eagerly, the rest lazily), visits interleaved so that a busy machine affects each alike.

Usage::

    .venv/bin/python bench/gallery_page.py [--variants 500] [--runs 5] [--width 1366 --height 768] [--eager-thumbs 0,40]

Needs Debian's Chromium (/usr/bin/chromium, or --chromium) and the playwright wheel (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_S = 2.0
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Runs before any of the page's scripts (DevTools protocol: exempt from the page's CSP).
READY_PROBE = """
(() => {
  const seen = () => { if (document.body && document.body.dataset.galleryReady === "1" && !window.__readyAt)
                         window.__readyAt = performance.now(); };
  new MutationObserver(seen).observe(document, {attributes: true, subtree: true, attributeFilter: ["data-gallery-ready"]});
})();
"""
# performance.now() once every thumbnail that intersects the viewport has decoded, else null.
VISIBLE_THUMBS_DONE = """
(() => {
  const imgs = Array.from(document.querySelectorAll('#gallery img.thumb'))
    .filter(i => { const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; });
  return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? performance.now() : null;
})()
"""


def _measure(page, base: str, path: str, variants: int) -> dict[str, float]:
    """One visit of the grid page in a fresh context; times in ms from navigation start (browser clocks)."""
    page.goto(base + path, wait_until="load")
    deadline = time.monotonic() + 30
    while not page.evaluate("window.__readyAt !== undefined"):
        if time.monotonic() > deadline:
            raise SystemExit("the gallery never became ready (galleryReady unset after 30 s)")
        time.sleep(0.01)
    m = page.evaluate("""() => { const n = performance.getEntriesByType("navigation")[0];
        return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd, ready: window.__readyAt, response: n.responseEnd,
                cards: document.querySelectorAll('#gallery .card').length}; }""")
    assert m["cards"] == variants, m
    # Rendered: every thumbnail in the viewport decoded (polled every 10 ms, the page's own clock).
    while (shown := page.evaluate(VISIBLE_THUMBS_DONE)) is None:
        if time.monotonic() > deadline:
            raise SystemExit("the visible thumbnails never finished loading")
        time.sleep(0.01)
    m["visible"] = shown
    # The keys work: focus the first card and approve it (lazy thumbnails may still be loading), then, at network
    # idle, take the approval back. Each waits until the card shows the server's answer.
    first_card = page.locator("#gallery .card").first
    t = time.perf_counter()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("a")
    first_card.and_(page.locator('[data-status="approved"]')).wait_for()
    m["key_busy"] = (time.perf_counter() - t) * 1000
    page.wait_for_load_state("networkidle")
    m["thumbs"] = page.evaluate("performance.getEntriesByType('resource').filter(r => r.name.includes('/thumbs/')).length")
    t = time.perf_counter()
    page.keyboard.press("a")
    first_card.and_(page.locator('[data-status="pending"]')).wait_for()
    m["key_idle"] = (time.perf_counter() - t) * 1000
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=500, help="variants in the one row/channel grid (default 500)")
    ap.add_argument("--runs", type=int, default=5, help="visits per setting; the first with a cold thumbnail cache")
    ap.add_argument("--width", type=int, default=1366)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--eager-thumbs", default=None,
                    help="comma-separated counts of eagerly loaded thumbnails to compare, visits interleaved "
                         "(default: the gallery's own setting)")
    ap.add_argument("--chromium", default=os.environ.get("ADFORGE_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

    from argon2 import PasswordHasher
    from fastapi.testclient import TestClient
    from playwright.sync_api import sync_playwright

    import review.auth
    import review.pages
    from review.app import create_app
    from review.thumbs import ThumbnailCache
    from storage.assets import open_store
    from storage.database import open_database, sqlite_url
    from tests.review.world import PASSWORD, build_world, serve_app

    default_eager = review.pages.EAGER_THUMBS
    settings = [int(x) for x in args.eager_thumbs.split(",")] if args.eager_thumbs else [default_eager]
    # Sign-in cost is not what this measures: cheap hashes, as in the tests.
    review.auth._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    review.auth._dummy_hash.cache_clear()

    work = Path(tempfile.mkdtemp(prefix="adforge-gallery-bench-"))
    try:
        url, store_url = sqlite_url(work / "adforge.db"), str(work / "assets")
        t0 = time.perf_counter()
        db = open_database(url)
        # One brief row: build_world makes both channels, so the row/channel grid below holds exactly --variants.
        world = build_world(db, open_store(store_url), store_url, per_channel=args.variants, row_keys=("hero-01",))
        db.dispose()
        print(f"world: {2 * args.variants} stored variants ({args.variants} in the measured grid) "
              f"in {time.perf_counter() - t0:.1f} s")
        row = world.rows["hero-01"]
        path = f"/campaigns/{world.campaign_id}/gallery?row={row}&channel=instagram_square"
        app = create_app(url, store_url, secret_key="bench", cache_dir=work / "thumbs")

        # ---- server-side render, in process (reference)
        client = TestClient(app, follow_redirects=False)
        token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)
        assert client.post("/login", data={"name": "vic", "password": PASSWORD, "csrf_token": token}).status_code == 303
        first = client.get(path)
        assert first.status_code == 200 and first.text.count('<article class="card"') == args.variants
        server_times = []
        for _ in range(max(5, args.runs)):
            t = time.perf_counter()
            client.get(path)
            server_times.append(time.perf_counter() - t)
        html_kb = len(first.content) / 1024

        # ---- the browser
        server, thread, port = serve_app(app)
        base = f"http://127.0.0.1:{port}"
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in settings}
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
                print(f"browser: Chromium {browser.version} (headless), viewport {args.width}x{args.height}")
                login = browser.new_context()
                page = login.new_page()
                page.goto(f"{base}/login")
                page.fill("#login-name", "rita")
                page.fill("#login-password", PASSWORD)
                page.click("#login-submit")
                page.wait_for_url(base + "/")
                state = login.storage_state()  # the session cookie, for every measured context
                login.close()
                for i in range(args.runs):
                    for n in settings:
                        review.pages.EAGER_THUMBS = n
                        # Each setting has its own thumbnail cache, so each has one cold first visit.
                        app.state.thumbs = ThumbnailCache(work / f"thumbs-{n}")
                        ctx = browser.new_context(storage_state=state, viewport={"width": args.width, "height": args.height})
                        ctx.add_init_script(READY_PROBE)
                        runs[n].append(_measure(ctx.new_page(), base, path, args.variants))
                        ctx.close()
                browser.close()
        finally:
            review.pages.EAGER_THUMBS = default_eager
            server.should_exit = True
            thread.join(timeout=15)

        # ---- report
        print(f"page: {args.variants} cards, {html_kb:.0f} KiB of HTML; server render (in-process TestClient): "
              f"median {statistics.median(server_times) * 1000:.0f} ms, min {min(server_times) * 1000:.0f} ms "
              f"over {len(server_times)}")
        print("ms from navigation start (browser clocks). visible = every thumbnail in the viewport decoded; "
              "a key = ArrowRight + a until the card shows the server's answer, while lazy thumbnails load (busy) "
              "and at network idle")
        for n in settings:
            print(f"\n{n} eager thumbnails" + (" (the gallery's setting)" if n == default_eager else ""))
            print(f"{'visit':>6} {'response':>9} {'DOMContentLoaded':>17} {'load':>6} {'interactive':>12} {'visible':>8} "
                  f"{'thumbs':>7} {'a key busy':>11} {'a key idle':>11}")
            for i, m in enumerate(runs[n]):
                print(f"{'cold' if i == 0 else i:>6} {m['response']:9.0f} {m['dcl']:17.0f} {m['load']:6.0f} {m['ready']:12.0f} "
                      f"{m['visible']:8.0f} {m['thumbs']:7d} {m['key_busy']:11.0f} {m['key_idle']:11.0f}")
            warm = runs[n][1:] or runs[n]
            for name, key in (("DOMContentLoaded", "dcl"), ("load", "load"), ("interactive", "ready"),
                              ("visible thumbnails", "visible")):
                med = statistics.median(m[key] for m in warm) / 1000
                worst = max(m[key] for m in runs[n]) / 1000
                line = f"{name:>18}: median {med:.3f} s (warm), worst {worst:.3f} s (cold {runs[n][0][key] / 1000:.3f} s)"
                if key in ("ready", "visible"):  # the target: rendered and interactive
                    line += (f" -> {'OK' if worst < TARGET_S else 'OVER'} vs the {TARGET_S:.0f} s target "
                             f"({worst / TARGET_S:.0%} of it)")
                print(line)
        try:
            print(f"\nload average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        except OSError:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

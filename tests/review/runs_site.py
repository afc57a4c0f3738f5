"""Shared by the run page tests (tests/review/test_run_pages.py, test_runs_browser.py): a gallery that can really
start runs (the local worker: ``python -m cli run`` subprocesses), briefs good and bad, and a clean stop of whatever
is still running when a test ends."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from review.app import create_app
from review.config import GalleryConfig
from review.security import CurrentUser
from review.submissions import cancel_submission, get_submission, list_submissions
from storage.assets import open_store
from storage.database import Database, open_database, sqlite_url
from tests.review.world import World, build_world

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_BRIEF = REPO / "examples" / "briefs" / "spring-launch.csv"
# Every row wrong: rejected outright (no Start). Row numbers are the file's lines, as `adforge plan` prints them.
BAD_BRIEF = (b"campaign,row_id,subject,channels,variants\n"
             b"spring,r1,a red circle,tv,2\n"
             b"spring,r2,,banner,abc\n")
# One bad row (line 2) and two good ones: the good rows can start, the bad one is skipped.
PARTIAL_BRIEF = (b"campaign,row_id,subject,channels,variants\n"
                 b"tiny-spring,r1,a red circle,tv,2\n"
                 b"tiny-spring,r2,a blue square,instagram_square,1\n"
                 b"tiny-spring,r3,a green triangle,instagram_square,1\n")
ADMIN = CurrentUser(0, "ada", "admin")


def runs_site(tmp_path: Path, *, model: Path | None = None, **config: Any) -> tuple[World, FastAPI, Database]:
    """A world (tests.review.world) and a gallery over the same SQLite database and store that starts real runs;
    ``model``: the default checkpoint of those runs (None: the bundled model)."""
    url = sqlite_url(tmp_path / "adforge.db")
    store_url = str(tmp_path / "assets")
    db = open_database(url)
    world = build_world(db, open_store(store_url), store_url)
    run_config = tmp_path / "adforge.toml"
    run_config.write_text(f"model = {json.dumps(str(model))}\n" if model else "", encoding="utf-8")
    app = create_app(url, store_url, secret_key="runs-test-secret", cache_dir=tmp_path / "thumbs",
                     run_config=str(run_config),
                     config=GalleryConfig(briefs_dir=str(tmp_path / "briefs"), **config))
    return world, app, db


def stop_runs(app: FastAPI) -> None:
    """Cancel whatever this gallery still runs (a failed test must not leave render processes behind)."""
    for sub in list_submissions(app.state, limit=200):
        if not sub.get("terminal"):
            try:
                cancel_submission(app.state, sub["id"], user=ADMIN)
            except Exception as exc:  # already finished meanwhile
                print(f"submission {sub['id']}: {exc}")


def wait_terminal(app: FastAPI, submission_id: int, timeout: float = 300) -> dict:
    """The submission once it has ended (the worker's exit is noticed by the launcher's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        sub = get_submission(app.state, submission_id) or {}
        if sub.get("terminal"):
            return sub
        if time.monotonic() > deadline:
            raise AssertionError(f"submission {submission_id} still {sub.get('status')} after {timeout} s: {sub}")
        time.sleep(0.5)

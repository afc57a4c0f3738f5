"""Real runs through the REST API: a local worker process (`python -m cli run --submission ID`) on the tiny
campaign model, polled to completion, its assets listed and downloaded through the API's URLs, the signed
completion webhook received by a real HTTP server; idempotent re-submission; cancel of a running submission."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from review.run_launcher import process_alive
from review.webhooks import verify_signature
from storage.schema import Asset, Run
from tests.review.api_world import TINY_BRIEF, WEBHOOK_SECRET, make_world, upload
from tests.review.world import audit_entries

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")


@pytest.fixture
def world(tmp_path: Path, sqlite_db_url: str, campaign_model: Path, prefect_harness: str, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)  # the worker uses the session's Prefect server
    monkeypatch.setenv("ADFORGE_THREADS", "1")
    w = make_world(tmp_path, sqlite_db_url, campaign_model, api_burst=1000, api_rate_per_minute=6000)  # polling
    yield w
    w.app.state.db.dispose()


def _poll(client, run_id: int, until, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/runs/{run_id}").json()
        if until(body):
            return body
        time.sleep(0.3)
    pytest.fail(f"run {run_id} did not get there in {timeout} s: {body}")


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_submit_poll_list_download_and_webhook(world) -> None:
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/done"
    client = world.client("rita-submit")
    try:
        first = upload(client, key="order-42", webhook_url=hook_url)
        assert first.status_code == 201, first.text
        run = first.json()
        assert run["status"] in ("queued", "running") and run["backend"] == "local" and run["submitted_by"] == "rita"
        again = upload(client, key="order-42", webhook_url=hook_url)
        assert again.status_code == 200 and again.json()["id"] == run["id"]  # the same submission, nothing new
        other = upload(client, TINY_BRIEF.replace("red", "green"), key="order-42", webhook_url=hook_url)
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"

        done = _poll(client, run["id"], lambda b: b["terminal"])
        assert done["status"] == "completed", done
        assert done["counts"]["planned"] == 2 and done["counts"]["rendered"] == 2 and done["counts"]["failed"] == 0
        assert done["progress"]["fraction"] == 1.0 and done["run_id"] is not None

        page = client.get(f"/api/v1/runs/{run['id']}/assets?per_page=1").json()
        assert page["total"] == 2 and len(page["assets"]) == 1
        rest = client.get(f"/api/v1/runs/{run['id']}/assets?page=2&per_page=1").json()["assets"]
        assets = page["assets"] + rest
        db = world.app.state.db
        with db.session() as s:
            recorded = s.scalar(select(func.count(Asset.id)).where(Asset.run_id == done["run_id"]))
            linked = s.get(Run, done["run_id"]).submission_id
        assert recorded == 2 and linked == run["id"]
        for a in assets:
            assert a["channel"] == "instagram_square"
            r = client.get(a["url"])
            assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
            assert client.get(f"/api/v1/assets/{a['id']}").json()["sha256"] == a["sha256"]
            thumb = client.get(a["thumb"])  # a token client's thumbnail: no session cookie needed
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
            assert max(Image.open(io.BytesIO(thumb.content)).size) <= 320
        assert client.get(f"/api/v1/assets/{assets[0]['id']}/thumb?w=123").json()["error"]["code"] == "invalid_width"
        assert client.get(f"/api/v1/runs/{run['id']}/brief").content == TINY_BRIEF.encode()
        assert [e.after["brief"] for e in audit_entries(db, action="submission.created")] == ["tiny.csv"]

        deadline = time.monotonic() + 30
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.1)
        headers, body = _Hook.received[0]
        assert verify_signature(WEBHOOK_SECRET, headers["X-Adforge-Timestamp"], body, headers["X-Adforge-Signature"])
        assert not verify_signature("another-secret-of-sufficient-length!", headers["X-Adforge-Timestamp"], body,
                                    headers["X-Adforge-Signature"])
        assert not verify_signature(WEBHOOK_SECRET, headers["X-Adforge-Timestamp"], body + b" ",
                                    headers["X-Adforge-Signature"])
        payload = json.loads(body)
        assert payload["submission_id"] == run["id"] and payload["status"] == "completed"
        assert payload["counts"]["rendered"] == 2
        _poll(client, run["id"], lambda b: b["webhook"]["state"] == "delivered", timeout=10)
        assert len(_Hook.received) == 1
    finally:
        server.shutdown()


def test_cancel_stops_the_worker_and_is_audited(world) -> None:
    brief = "campaign,row_id,subject,channels,variants\n" + "".join(
        f"api-cancel,row-{i},a red circle,instagram_square,4\n" for i in range(6))
    client = world.client("rita-submit")
    r = upload(client, brief, "long.csv", steps=20)
    assert r.status_code == 201, r.text
    run = r.json()
    with world.app.state.db.session() as s:
        from storage.review_schema import Submission

        pid = s.get(Submission, run["id"]).pid
    assert pid and process_alive(pid)
    _poll(client, run["id"], lambda b: b["run_id"] is not None and b["status"] == "running")
    cancelled = client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["cancel"]["requested_by"] == "rita"
    assert not process_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    db = world.app.state.db
    with db.session() as s:
        assert s.get(Run, body["run_id"]).status == "cancelled"
    entries = audit_entries(db, action="submission.cancelled")
    assert [(e.actor, e.entity_id) for e in entries] == [("rita", str(run["id"]))]
    again = client.post(f"/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_finished"
    assert body["counts"]["rendered"] < 24

"""Shared by the review tests (tests/review, tests/cli) and bench/gallery_page.py: a campaign as a run leaves it in
the database and the asset store, and gallery users; the audit log read back; the gallery served on a free port;
a signed-in TestClient (``Browser``).

Rows are inserted through ``storage.schema`` the way ``flows.recording`` writes them, with small real PNG files in
the store; no model is loaded, so building a world takes milliseconds. Modules that sign users in use the
``cheap_password_hashes`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from review.auth import add_user
from storage.assets import AssetStore, asset_key
from storage.database import Database
from storage.schema import Asset, AuditEntry, Brief, BriefRowRecord, Campaign, ModelRecord, PromptRecord, Run, Variant

PASSWORD = "correct horse battery"
USERS = {"ada": "admin", "rita": "reviewer", "vic": "viewer"}
CHANNELS = {"instagram_square": (400, 400), "leaderboard": (728, 90)}


@dataclass
class World:
    db: Database
    store: AssetStore
    store_url: str
    campaign_id: int
    rows: dict[str, int]  # row key -> brief_rows.id
    variants: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (row key, channel) -> variant ids
    assets: dict[int, int] = field(default_factory=dict)  # variant id -> asset id
    keys: dict[int, str] = field(default_factory=dict)  # asset id -> storage key

    def asset_of(self, variant_id: int) -> int:
        return self.assets[variant_id]


def _png(width: int, height: int, shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 90)).save(out, "PNG")
    return out.getvalue()


def build_world(db: Database, store: AssetStore, store_url: str, *, prompt: str = "a red bicycle, studio light",
                per_channel: int = 3, row_keys: tuple[str, ...] = ("hero-01", "hero-02")) -> World:
    """One campaign, two brief rows (different templates and models), two channels, ``per_channel`` stored variants each."""
    with db.session() as s:
        campaign = Campaign(name="spring-launch")
        brief = Brief(sha256="b" * 64, file_name="spring-launch.csv", encoding="utf-8", columns={"columns": ["campaign"]})
        models = [
            ModelRecord(name="campaign-tiny", path="/models/campaign-tiny.safetensors", sha256="1" * 64, short_hash="1111111111",
                        family="sd1", license="creativeml-openrail-m", commercial_use=True),
            ModelRecord(name="brand-v3", path="/models/brand-v3.safetensors", sha256="2" * 64, short_hash="2222222222",
                        family="sd1", license="acme-internal", commercial_use=True),
        ]
        s.add_all([campaign, brief, *models])
        s.flush()
        run = Run(brief_id=brief.id, brief_path="spring-launch.csv", status="completed", settings={"steps": 2})
        s.add(run)
        s.flush()
        world = World(db, store, store_url, campaign.id, {})
        shade = 0
        for r, key in enumerate(row_keys):
            row = BriefRowRecord(brief_id=brief.id, campaign_id=campaign.id, row_key=key, line=r + 2,
                                 data={"subject": f"bicycle {r}", "row_id": key})
            s.add(row)
            s.flush()
            world.rows[key] = row.id
            template = "default" if r == 0 else "banner"
            for channel, (w, h) in CHANNELS.items():
                p = PromptRecord(row_id=row.id, channel=channel, template=template, variation_index=0, prompt=prompt,
                                 negative_prompt="blurry, <b>bold</b>")
                s.add(p)
                s.flush()
                ids = world.variants.setdefault((key, channel), [])
                for i in range(per_channel):
                    identity = hashlib.sha256(f"{key}/{channel}/{i}".encode()).hexdigest()
                    seed = 1000 + 10 * r + i
                    storage_key = asset_key("spring-launch", key, channel, i, seed, "png", tag=identity[:10])
                    v = Variant(identity=identity, row_id=row.id, prompt_id=p.id, model_id=models[r % 2].id, first_run_id=run.id,
                                channel=channel, variant_index=i, seed=seed, sampler="DPM++ 2M Karras", steps=2, cfg_scale=7.0,
                                gen_width=64, gen_height=64, out_width=w, out_height=h, out_format="png", out_max_kb=150,
                                postprocess=f"cover-lanczos({w}x{h})", storage_key=storage_key, status="done")
                    s.add(v)
                    s.flush()
                    shade = (shade + 37) % 256
                    stored = store.put(storage_key, _png(w, h, shade), "image/png")
                    a = Asset(variant_id=v.id, run_id=run.id, store_url=stored.url, storage_key=stored.key, sha256=stored.sha256,
                              size_bytes=stored.size, format="png", width=w, height=h,
                              infotext=f"{prompt}\nSteps: 2, Seed: {seed}")
                    s.add(a)
                    s.flush()
                    ids.append(v.id)
                    world.assets[v.id] = a.id
                    world.keys[a.id] = stored.key
    for name, role in USERS.items():
        add_user(db, name, role, PASSWORD, actor="tests")
    return world


def audit_entries(db: Database, **where: Any) -> list[AuditEntry]:
    """The audit log in order, ``where`` column == value for every pair given."""
    with db.session() as s:
        stmt = select(AuditEntry).order_by(AuditEntry.id)
        for k, v in where.items():
            stmt = stmt.where(getattr(AuditEntry, k) == v)
        return list(s.scalars(stmt))


def serve_app(app: Any) -> tuple[Any, threading.Thread, int]:
    """``app`` served by uvicorn in a daemon thread on 127.0.0.1 (a free port); returns (server, thread, port) once
    it has started. Stop it with ``server.should_exit = True`` and join the thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with another process
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"gallery-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gallery server did not start")
        time.sleep(0.02)
    return server, thread, port


class Browser:
    """A signed-in client: remembers the session's CSRF token and sends it the way the gallery's pages do."""

    def __init__(self, app: FastAPI, name: str | None = None, *, address: str = "testclient"):
        self.client = TestClient(app, follow_redirects=False, client=(address, 50000))
        self.csrf = csrf_of(self.client.get("/login").text)
        if name:
            r = self.client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": self.csrf, "next": "/"})
            assert r.status_code == 303, r.text
            self.csrf = csrf_of(self.client.get("/").text)  # a new session gets a new token

    def get(self, url: str, **kw) :
        return self.client.get(url, **kw)

    def post_json(self, url: str, body: dict[str, Any], *, token: str | None = "session") :
        headers = {} if token is None else {"X-CSRF-Token": self.csrf if token == "session" else token}
        return self.client.post(url, json=body, headers=headers)

    def post_form(self, url: str, data: dict[str, Any] | None = None, *, token: str | None = "session", **kw) :
        data = dict(data or {})
        if token is not None:
            data["csrf_token"] = self.csrf if token == "session" else token
        return self.client.post(url, data=data, **kw)

    def review(self, variant_id: int, **change: Any) :
        return self.post_json(f"/api/variants/{variant_id}/review", change)


def csrf_of(html: str) -> str:
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert m, "page has no CSRF token"
    return m.group(1)

"""Shared by the REST API tests: a gallery app with run settings (tiny model, 1-2 steps), users and tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from review.app import create_app
from review.auth import add_user
from review.config import GalleryConfig
from review.tokens import create_token
from tests.review.world import PASSWORD, USERS

WEBHOOK_SECRET = "s3cret-webhook-key-for-tests-0123456789"
TINY_BRIEF = ("campaign,row_id,subject,channels,variants\n"
              "api-test,row-1,a red circle,instagram_square,1\n"
              "api-test,row-2,a blue square,instagram_square,1\n")


@dataclass
class ApiWorld:
    app: object
    tmp: Path
    tokens: dict[str, str]  # "rita-submit", "rita-read", "vic-read", "ada-submit" -> token text

    def client(self, token: str | None = None) -> TestClient:
        c = TestClient(self.app, follow_redirects=False)
        if token is not None:
            c.headers["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        return c


def make_world(tmp: Path, db_url: str, model: Path, *, steps: int = 1, max_rows: int = 50, **config) -> ApiWorld:
    store = tmp / "assets"
    toml = tmp / "adforge.toml"
    toml.write_text(f'model = "{model}"\nsteps = {steps}\nbatch_size = 2\ndevice = "cpu"\nbrief_max_rows = {max_rows}\n'
                    'blocklist = "off"\nwatermark = "off"\n', encoding="utf-8")
    gallery = GalleryConfig(briefs_dir=str(tmp / "briefs"), webhook_secret=WEBHOOK_SECRET, **config)
    app = create_app(db_url, str(store), config=gallery, run_config=str(toml), secret_key="k" * 32)
    db = app.state.db
    for name, role in USERS.items():
        add_user(db, name, role, PASSWORD, actor="test")
    tokens = {}
    for name, scope in (("rita", "submit"), ("rita", "read"), ("vic", "read"), ("ada", "submit")):
        tokens[f"{name}-{scope}"], _ = create_token(db, name, f"{name} {scope}", scope, actor="test")
    return ApiWorld(app, tmp, tokens)


def upload(client: TestClient, body: str | bytes = TINY_BRIEF, name: str = "tiny.csv", *, key: str | None = None,
           path: str = "/api/v1/runs", **fields):
    headers = {"Idempotency-Key": key} if key else {}
    data = body.encode() if isinstance(body, str) else body
    return client.post(path, files={"brief": (name, data, "text/csv")}, data={k: str(v) for k, v in fields.items()},
                       headers=headers)

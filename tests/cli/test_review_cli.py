"""The review commands: ``adforge users add/list``, ``export``, ``results import``, ``audit export``, ``gallery``."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from review.actions import ReviewChange, apply_review
from review.auth import authenticate
from storage.assets import open_store
from storage.database import open_database
from storage.review_schema import User
from tests.review.world import build_world

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("cheap_password_hashes")  # users are added and signed in here too


@pytest.fixture
def world(sqlite_db_url: str, tmp_path: Path):
    db = open_database(sqlite_db_url)
    store_url = str(tmp_path / "assets")
    w = build_world(db, open_store(store_url), store_url)
    yield w, sqlite_db_url, store_url
    db.dispose()


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input, catch_exceptions=False)


def test_users_add_hashes_the_password_and_refuses_bad_input(sqlite_db_url: str) -> None:
    r = invoke("users", "add", "mara", "--role", "admin", "--password-stdin", "--db", sqlite_db_url, input="s3cret-enough\n")
    assert r.exit_code == 0, r.output
    db = open_database(sqlite_db_url)
    try:
        from sqlalchemy import select

        with db.session() as s:
            user = s.scalar(select(User).where(User.name == "mara"))
            assert user.role == "admin" and user.password_hash.startswith("$argon2id$") and "s3cret" not in user.password_hash
        assert authenticate(db, "mara", "s3cret-enough") is not None and authenticate(db, "mara", "wrong") is None
    finally:
        db.dispose()
    assert invoke("users", "add", "mara", "--password-stdin", "--db", sqlite_db_url, input="another-one\n").exit_code == 2
    assert invoke("users", "add", "bob", "--role", "boss", "--password-stdin", "--db", sqlite_db_url, input="long-enough\n").exit_code == 2
    assert invoke("users", "add", "Bob Smith", "--password-stdin", "--db", sqlite_db_url, input="long-enough\n").exit_code == 2
    assert invoke("users", "add", "bob", "--password-stdin", "--db", sqlite_db_url, input="short\n").exit_code == 2
    listed = invoke("users", "list", "--db", sqlite_db_url)
    assert listed.exit_code == 0 and listed.stdout.splitlines()[0].startswith("mara\tadmin\tactive")


def test_export_results_and_audit_from_the_command_line(world, tmp_path: Path) -> None:
    w, db_url, store_url = world
    sq = w.variants[("hero-01", "instagram_square")]
    for vid, group in ((sq[0], "A"), (sq[1], "B")):
        apply_review(w.db, vid, ReviewChange(status="approved", group=group), actor="rita")

    out = tmp_path / "out" / "final.zip"
    r = invoke("export", "--campaign", "spring-launch", "--approved", "--out", str(out), "--db", db_url, "--store", store_url,
               "--name", "instagram_square={campaign}-{group}-{width}.{ext}")
    assert r.exit_code == 0, r.output
    zf = zipfile.ZipFile(out)
    assert sorted(zf.namelist()) == ["manifest.csv", "spring-launch-A-400.png", "spring-launch-B-400.png"]
    manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    for m in manifest:
        assert hashlib.sha256(zf.read(m["file_name"])).hexdigest() == m["sha256"]
    assert not list(out.parent.glob(".*.part"))  # written atomically, nothing left behind
    assert invoke("export", "--campaign", "nope", "--db", db_url, "--store", store_url).exit_code == 1
    assert invoke("export", "--campaign", "spring-launch", "--name", "x", "--db", db_url, "--store", store_url).exit_code == 2

    results = tmp_path / "results.csv"
    results.write_text("file_name,impressions,clicks,conversions\nspring-launch-A-400.png,1000,200,3\n"
                       "spring-launch-B-400.png,1000,150,2\n")
    r = invoke("results", "import", str(results), "--campaign", "spring-launch", "--db", db_url)
    assert r.exit_code == 0, r.output
    assert "spring-launch / hero-01 / instagram_square: group A wins" in r.stdout and "p = 0.003256" in r.stdout
    assert "lift +33.3% (A vs B)" in r.stdout
    strict = invoke("results", "import", str(results), "--confidence", "0.999", "--db", db_url)
    assert "no winner" in strict.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("asset_id,impressions,clicks\n1,5,6\n")
    assert invoke("results", "import", str(bad), "--db", db_url).exit_code == 2

    prefix = tmp_path / "audit" / "spring"
    prefix.parent.mkdir()
    r = invoke("audit", "export", "--campaign", "spring-launch", "--out", str(prefix), "--db", db_url)
    assert r.exit_code == 0, r.output
    data = json.loads(prefix.with_suffix(".json").read_text())
    a = next(x for x in data["assets"] if x["variant_id"] == sq[0])
    assert [d["action"] for d in a["decisions"]] == ["review.updated", "campaign.exported", "results.imported"]
    assert a["decisions"][0]["actor"] == "rita" and a["decisions"][1]["actor"].startswith("cli:")
    rows = list(csv.DictReader(prefix.with_suffix(".csv").open(encoding="utf-8", newline="")))
    assert len(rows) == 12 and {r["campaign"] for r in rows} == {"spring-launch"}
    assert invoke("audit", "export", "--campaign", "nope", "--db", db_url).exit_code == 2


def test_gallery_command_builds_the_app_and_serves_it(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w, db_url, store_url = world
    served = {}

    def fake_run(application, host: str, port: int, log_level: str) -> None:
        served.update(app=application, host=host, port=port)

    monkeypatch.setattr("uvicorn.run", fake_run)
    r = invoke("gallery", "--port", "9999", "--db", db_url, "--store", store_url, "--cache-dir", str(tmp_path / "t"),
               "--approvals-needed", "3")
    assert r.exit_code == 0, r.output
    assert served["host"] == "127.0.0.1" and served["port"] == 9999
    assert served["app"].state.defaults.approvals_needed == 3
    served["app"].state.db.dispose()
    assert invoke("gallery", "--s3-delivery", "ftp", "--db", db_url, "--store", store_url).exit_code == 2


def test_csv_exports_guard_against_formulas() -> None:
    from review.csvutil import safe_cell

    assert safe_cell("=HYPERLINK(\"http://x\")") == "'=HYPERLINK(\"http://x\")"
    assert safe_cell("@SUM(A1)") == "'@SUM(A1)" and safe_cell("-1") == "-1" and safe_cell(-1) == -1
    assert safe_cell("a red bicycle") == "a red bicycle"


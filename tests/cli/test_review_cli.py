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



def test_users_passwd_role_disable_enable_remove(world) -> None:
    from sqlalchemy import select

    from storage.schema import AuditEntry

    w, db_url, _ = world
    ok = lambda *a, input=None: invoke("users", *a, "--db", db_url, input=input)  # noqa: E731
    r = ok("passwd", "rita", "--password-stdin", input="brand-new-secret\n")
    assert r.exit_code == 0 and "password of rita changed" in r.stdout + r.stderr
    assert authenticate(w.db, "rita", "brand-new-secret") is not None
    assert ok("passwd", "rita", "--password-stdin", input="short\n").exit_code == 2
    assert ok("passwd", "ghost", "--password-stdin", input="long-enough-1\n").exit_code == 2
    assert ok("role", "rita", "admin").exit_code == 0 and ok("role", "rita", "boss").exit_code == 2
    assert ok("disable", "vic").exit_code == 0 and authenticate(w.db, "vic", "correct horse battery") is None
    assert "vic\tviewer\tdisabled" in ok("list").stdout
    assert ok("enable", "vic").exit_code == 0 and authenticate(w.db, "vic", "correct horse battery") is not None
    r = ok("remove", "vic")
    assert r.exit_code == 0 and "user vic removed" in r.stdout + r.stderr
    assert "vic\tviewer\tremoved" in ok("list").stdout
    assert ok("enable", "vic").exit_code == 2
    r = ok("add", "vic", "--password-stdin", input="long-enough-2\n")
    assert r.exit_code == 2 and "names are not reused" in r.stderr
    with w.db.session() as s:
        actions = [(e.action, e.actor.startswith("cli:")) for e in s.scalars(
            select(AuditEntry).where(AuditEntry.action.like("user.%"), AuditEntry.actor != "tests").order_by(AuditEntry.id))]
    assert [a for a, by_cli in actions if by_cli] == ["user.password_changed", "user.role_changed", "user.disabled",
                                                      "user.enabled", "user.removed"]


def test_export_name_patterns_that_cannot_work_are_one_line_errors(world) -> None:
    w, db_url, store_url = world
    for pattern, message in (("{seed:>99999999999999999999}", "width or precision in {seed:>9999999999999999999…} is over 255"),
                             ("{seed:>100000}", "is over 255"), ("{campaign:d}.{ext}", "Unknown format code 'd'"),
                             ("{row", "expected '}' before end of string")):
        r = invoke("export", "--campaign", "spring-launch", "--db", db_url, "--store", store_url, "--name", f"skyscraper={pattern}")
        assert r.exit_code == 2, (pattern, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and "Traceback" not in r.output


def test_export_names_are_capped_and_stay_unique(sqlite_db_url: str, tmp_path: Path) -> None:
    db = open_database(sqlite_db_url)
    store_url = str(tmp_path / "assets")
    long_a, long_b = "a" * 4999 + "1", "a" * 4999 + "2"  # differ only past any cap
    try:
        build_world(db, open_store(store_url), store_url, row_keys=(long_a, long_b))
    finally:
        db.dispose()
    out = tmp_path / "long.zip"
    r = invoke("export", "--campaign", "spring-launch", "--out", str(out), "--db", sqlite_db_url, "--store", store_url)
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert len(names) == len(set(names)) == 13
        assert max(len(n.encode()) for n in names) <= 150
        zf.extractall(tmp_path / "unzipped")  # what a 5000-character name cannot do (ENAMETOOLONG)
        manifest = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    assert {m["file_name"] for m in manifest} == set(names) - {"manifest.csv"}
    assert {m["row"] for m in manifest} == {long_a, long_b}  # the manifest keeps the full row id


def _drop_access_log_files() -> None:
    """The app was built but never served, so its shutdown never took its access-log file off the process-wide logger:
    do it here, or later tests would log into this test's (deleted) folder."""
    import logging

    from review.middleware import ACCESS_LOGGER

    logger = logging.getLogger(ACCESS_LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


def test_gallery_limits_come_from_the_config_file(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w, db_url, store_url = world
    served = {}
    monkeypatch.setattr("uvicorn.run", lambda application, **kw: served.update(app=application))
    config = tmp_path / "adforge.toml"
    config.write_text('[adforge]\nsteps = 20\n\n[gallery]\nmax_body_bytes = 32768\naccount_failures = 3\n')
    r = invoke("gallery", "--db", db_url, "--store", store_url, "--config", str(config), "--cache-dir", str(tmp_path / "t"),
               "--access-log", str(tmp_path / "access.log"))
    assert r.exit_code == 0, r.output
    cfg = served["app"].state.config
    assert (cfg.max_body_bytes, cfg.account_failures, cfg.lock_minutes) == (32768, 3, 15)
    assert cfg.access_log == str(tmp_path / "access.log")
    assert served["app"].state.samplers.resolve("euler_a") == "Euler a"
    served["app"].state.db.dispose()
    _drop_access_log_files()
    config.write_text('[adforge]\nsteps = 20\n\n[gallery]\nmax_body_byte = 1\n')
    r = invoke("gallery", "--db", db_url, "--store", store_url, "--config", str(config))
    assert r.exit_code == 2 and "unknown gallery setting(s) max_body_byte" in r.stderr
    config.write_text('[adforge]\n[gallery]\nlock_minutes = 0\n')
    r = invoke("gallery", "--db", db_url, "--store", store_url, "--config", str(config))
    assert r.exit_code == 2 and "'lock_minutes' must be a whole number >= 1, got 0" in r.stderr

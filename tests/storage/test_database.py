"""The metadata database: migrations on both backends, schema/migration agreement, the append-only audit log,
SQLite pragmas, retries on transient errors and the errors ``open_database`` raises.

Every test that touches a database runs on SQLite and PostgreSQL (the ``db_url`` fixture in conftest.py)."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from botocore.exceptions import ClientError, EndpointConnectionError
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from storage.database import (
    MIGRATIONS,
    Database,
    DatabaseError,
    audit,
    head_revision,
    open_database,
    retry_transient,
    sqlite_url,
)
from storage.retrying import is_transient, retry_call
from storage.schema import AuditEntry, Base, Brief, BriefRowRecord, Campaign
from tests.helpers import alembic_step

TABLES = {"models", "campaigns", "briefs", "brief_rows", "prompts", "variants", "variant_upscalers", "assets", "runs", "audit_log"}


# ------------------------------------------------------------------------------------------------ helpers




def _schema_differences(db: Database) -> list:
    """What Alembic's autogenerate would change to make the database equal to the SQLAlchemy models."""
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, Base.metadata)


def _tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names())


def _audit_guard_count(db: Database) -> int:
    """How many append-only guards (triggers) exist on audit_log in the database's own schema."""
    with db.engine.connect() as conn:
        if db.dialect == "sqlite":
            return conn.scalar(text("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'"))
        return conn.scalar(text(
            "SELECT count(*) FROM information_schema.triggers "
            "WHERE event_object_table = 'audit_log' AND trigger_schema = current_schema()"
        ))


def _add_audit_entry(db: Database, action: str = "test.appended") -> int:
    with db.session() as s:
        entry = audit(s, actor="tests", action=action, entity="thing", entity_id=7, after={"k": "v"})
        s.flush()
        return entry.id


# ------------------------------------------------------------------------------------------------ migrations


def test_open_database_upgrades_a_fresh_database_to_head(db: Database) -> None:
    """Opening a new database creates every table and stamps the newest revision."""
    assert head_revision() == "0011"
    assert db.revision() == head_revision()
    assert TABLES <= _tables(db)
    assert _audit_guard_count(db) >= 1


def test_open_without_upgrade_leaves_an_empty_database_alone(db_url: str) -> None:
    """``upgrade=False`` connects but creates nothing; a later open upgrades."""
    bare = open_database(db_url, upgrade=False)
    try:
        assert bare.revision() is None
        assert not (TABLES & _tables(bare))
    finally:
        bare.dispose()
    upgraded = open_database(db_url)
    try:
        assert upgraded.revision() == head_revision()
    finally:
        upgraded.dispose()


def test_opening_twice_is_idempotent_and_keeps_data(db: Database) -> None:
    """A second open of an up-to-date database runs no migration and loses nothing."""
    with db.session() as s:
        s.add(Campaign(name="spring"))
    again = open_database(db.url)
    try:
        assert again.revision() == head_revision()
        with again.session() as s:
            assert s.scalars(select(Campaign.name)).all() == ["spring"]
    finally:
        again.dispose()


def test_models_and_migration_agree(db: Database) -> None:
    """Autogenerate against a freshly migrated database finds nothing to change: schema.py == migration."""
    assert _schema_differences(db) == []


def test_downgrade_to_base_and_upgrade_again(db: Database) -> None:
    """The migration is reversible: base removes tables and guards, head brings both back and still agrees."""
    _add_audit_entry(db)
    alembic_step(db, command.downgrade, "base")
    assert db.revision() is None
    assert not (TABLES & _tables(db))
    assert _audit_guard_count(db) == 0
    if db.dialect == "postgresql":
        with db.engine.connect() as conn:
            assert conn.scalar(text(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE p.proname = 'audit_log_append_only' AND n.nspname = current_schema()"
            )) == 0

    alembic_step(db, command.upgrade, "head")
    assert db.revision() == head_revision()
    assert TABLES <= _tables(db)
    assert _schema_differences(db) == []
    entry_id = _add_audit_entry(db)
    with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": entry_id})


def test_alembic_command_line_path_migrates(db_url: str) -> None:
    """``alembic upgrade head`` with ``sqlalchemy.url`` (no connection handed in) migrates and commits."""
    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))  # ConfigParser interpolation
    command.upgrade(cfg, "head")
    database = open_database(db_url, upgrade=False)
    try:
        assert database.revision() == head_revision()
        assert TABLES <= _tables(database)
        assert _schema_differences(database) == []
    finally:
        database.dispose()


@pytest.mark.parametrize("url", ["sqlite:///unused.db", "postgresql+psycopg://u@127.0.0.1:1/unused"])
def test_offline_sql_includes_the_audit_guards(url: str) -> None:
    """``alembic upgrade head --sql`` (for a DBA to review) works without a database and includes the triggers."""
    out = io.StringIO()
    cfg = Config(output_buffer=out)
    cfg.set_main_option("script_location", os.fspath(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "head", sql=True)
    sql = out.getvalue()
    assert "CREATE TABLE audit_log" in sql
    assert "CREATE TRIGGER" in sql and "append-only" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql


def test_parallel_opens_of_a_fresh_postgres_database_do_not_race(postgres_url: str) -> None:
    """Several workers opening the same new PostgreSQL database at once: one migrates, none fails."""
    errors: list[BaseException] = []
    opened: list[Database] = []

    def worker() -> None:
        try:
            opened.append(open_database(postgres_url))
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len(opened) == 3
        assert {d.revision() for d in opened} == {head_revision()}
        with opened[0].engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == 1
    finally:
        for d in opened:
            d.dispose()


# ------------------------------------------------------------------------------------------------ audit log


def test_audit_log_accepts_inserts(db: Database) -> None:
    """The ORM helper and raw SQL can both append entries; JSON before/after round-trip."""
    entry_id = _add_audit_entry(db)
    with db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO audit_log (at, actor, action, entity, entity_id) "
            "VALUES (CURRENT_TIMESTAMP, 'dba', 'manual.note', 'thing', '8')"
        ))
    with db.session() as s:
        entries = s.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [e.action for e in entries] == ["test.appended", "manual.note"]
    assert entries[0].id == entry_id and entries[0].entity_id == "7" and entries[0].after == {"k": "v"}
    assert entries[0].before is None and entries[0].at is not None


@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET actor = 'mallory' WHERE id = :id",
    "DELETE FROM audit_log WHERE id = :id",
    "DELETE FROM audit_log",
])
def test_audit_log_refuses_raw_update_and_delete(db: Database, statement: str) -> None:
    """Hand-written SQL cannot edit or remove history; the entry stays as written."""
    entry_id = _add_audit_entry(db)
    with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as conn:
        conn.execute(text(statement), {"id": entry_id})
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT id, actor FROM audit_log")).all() == [(entry_id, "tests")]


def test_audit_log_refuses_truncate_on_postgres(postgres_url: str) -> None:
    """PostgreSQL's TRUNCATE bypasses row triggers; the statement trigger refuses it too."""
    database = open_database(postgres_url)
    try:
        _add_audit_entry(database)
        with pytest.raises(DBAPIError, match="append-only"), database.engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_log"))
        with database.engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM audit_log")) == 1
    finally:
        database.dispose()


def test_audit_log_refuses_orm_update_and_delete(db: Database) -> None:
    """Changing or deleting an AuditEntry through a session fails at flush and rolls back."""
    entry_id = _add_audit_entry(db)
    with pytest.raises(DBAPIError, match="append-only"), db.session() as s:
        s.get(AuditEntry, entry_id).actor = "mallory"
    with pytest.raises(DBAPIError, match="append-only"), db.session() as s:
        s.delete(s.get(AuditEntry, entry_id))
    with db.session() as s:
        assert s.get(AuditEntry, entry_id).actor == "tests"


def test_audit_entry_rolls_back_with_its_transaction(db: Database) -> None:
    """``audit`` writes in the caller's transaction: a failed change leaves no audit entry behind."""
    with pytest.raises(RuntimeError), db.session() as s:
        s.add(Campaign(name="doomed"))
        audit(s, actor="tests", action="campaign.created", entity="campaign", entity_id="doomed")
        s.flush()
        raise RuntimeError("boom")
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEntry)) == 0
        assert s.scalar(select(func.count()).select_from(Campaign)) == 0


# ------------------------------------------------------------------------------------------------ integrity / pragmas


def test_foreign_keys_are_enforced(db: Database) -> None:
    """A row pointing at a brief and campaign that do not exist is refused on both backends."""
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(BriefRowRecord(brief_id=999, campaign_id=999, row_key="r1", line=2, data={}))
        s.flush()


def test_unique_constraints_are_enforced(db: Database) -> None:
    """Two briefs with the same content hash are one brief."""
    with db.session() as s:
        s.add(Brief(sha256="a" * 64, file_name="a.csv"))
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Brief(sha256="a" * 64, file_name="b.csv"))


def test_sqlite_uses_wal_foreign_keys_and_busy_timeout(sqlite_db_url: str) -> None:
    """Every SQLite connection gets WAL journaling, enforced foreign keys and a busy timeout."""
    database = open_database(sqlite_db_url)
    try:
        with database.engine.connect() as conn:
            assert conn.scalar(text("PRAGMA journal_mode")) == "wal"
            assert conn.scalar(text("PRAGMA foreign_keys")) == 1
            assert conn.scalar(text("PRAGMA busy_timeout")) >= 1000
    finally:
        database.dispose()


def test_sqlite_creates_missing_parent_folders(tmp_path: Path) -> None:
    """A SQLite file under folders that do not exist yet is created with them."""
    path = tmp_path / "deep" / "er" / "adforge.db"
    database = open_database(sqlite_url(path))
    try:
        assert path.is_file()
        assert database.revision() == head_revision()
    finally:
        database.dispose()


def test_repr_hides_the_password() -> None:
    """A Database's repr (used in logs and error messages) never shows the password."""
    database = open_database("postgresql+psycopg://app:s3cret@127.0.0.1:1/campaigns", upgrade=False)
    try:
        assert "s3cret" not in repr(database)
        assert "campaigns" in repr(database)
        assert database.dialect == "postgresql"
    finally:
        database.dispose()


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("url", ["not a url", "", "://nohost"])
def test_invalid_url_raises_database_error(url: str) -> None:
    """A URL SQLAlchemy cannot parse is a DatabaseError that quotes it."""
    with pytest.raises(DatabaseError, match="invalid database URL"):
        open_database(url)


def test_invalid_url_error_does_not_show_the_password() -> None:
    with pytest.raises(DatabaseError) as info:
        open_database("postgresql+psycopg://admin:hunter2@db host/adforge?x=%zz")
    assert "hunter2" not in str(info.value) and "***@" in str(info.value)


def test_unknown_dialect_raises_database_error() -> None:
    """A URL naming a database SQLAlchemy does not know is a DatabaseError naming the URL."""
    with pytest.raises(DatabaseError, match=r"cannot use database URL nosuchdb://x/y"):
        open_database("nosuchdb://x/y")


def test_unreachable_postgres_raises_database_error_naming_it() -> None:
    """Nothing listens on port 1: the error names host, port and database, and hides the password."""
    with pytest.raises(DatabaseError) as info:
        open_database("postgresql+psycopg://app:s3cret@127.0.0.1:1/campaigns")
    message = str(info.value)
    assert "cannot open database" in message
    assert "127.0.0.1:1/campaigns" in message
    assert "s3cret" not in message


def test_sqlite_file_that_is_not_a_database_raises_database_error(tmp_path: Path) -> None:
    """Pointing the URL at some other file gives our DatabaseError naming the file, not a raw driver error."""
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not a database\n" * 20)
    with pytest.raises(DatabaseError, match="notes.db"):
        open_database(sqlite_url(path))


def test_sqlite_path_below_a_file_raises_database_error(tmp_path: Path) -> None:
    """A SQLite path whose 'folder' is a regular file cannot be created: DatabaseError naming the path."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatabaseError, match="afile"):
        open_database(sqlite_url(tmp_path / "afile" / "adforge.db"))


# ------------------------------------------------------------------------------------------------ retries


def _operational_error(message: str = "database is locked") -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception(message))


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


class Flaky:
    """Raises the given errors in turn, then returns ``result``; counts calls."""

    def __init__(self, errors: list[BaseException], result: object = "ok"):
        self.errors = list(errors)
        self.result = result
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls.append((args, kwargs))
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_retry_call_retries_operational_errors_until_success() -> None:
    """Two OperationalErrors then success: three calls, the result comes back, arguments passed each time."""
    fn = Flaky([_operational_error(), _operational_error()], result=42)
    assert retry_call(fn, "a", attempts=4, base_delay=0.0001, key="v") == 42
    assert fn.calls == [(("a",), {"key": "v"})] * 3


def test_retry_transient_decorator_retries_the_whole_function() -> None:
    """The decorator keeps the function's name and retries it on transient errors."""
    fn = Flaky([_operational_error(), _operational_error()], result="done")

    @retry_transient(attempts=3, base_delay=0.0001)
    def transaction(x: int) -> object:
        return fn(x)

    assert transaction.__name__ == "transaction"
    assert transaction(5) == "done"
    assert len(fn.calls) == 3


def test_retry_gives_up_after_the_last_attempt() -> None:
    """A transient error that never clears is raised after exactly ``attempts`` calls."""
    fn = Flaky([_operational_error(f"locked {i}") for i in range(10)])
    with pytest.raises(OperationalError, match="locked 2"):
        retry_call(fn, attempts=3, base_delay=0.0001)
    assert len(fn.calls) == 3


@pytest.mark.parametrize("error", [
    ValueError("bad value"),
    IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")),
    _client_error("AccessDenied", 403),
    _client_error("NoSuchBucket", 404),
    KeyError("x"),
], ids=["ValueError", "IntegrityError", "s3-403", "s3-404", "KeyError"])
def test_non_transient_errors_are_raised_at_once(error: BaseException) -> None:
    """Errors that a retry cannot fix are raised on the first call, unchanged."""
    fn = Flaky([error])
    with pytest.raises(type(error)) as info:
        retry_call(fn, attempts=5, base_delay=0.0001)
    assert info.value is error
    assert len(fn.calls) == 1


@pytest.mark.parametrize("error, transient", [
    (_operational_error(), True),
    (DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True), True),
    (DBAPIError("SELECT 1", {}, Exception("syntax")), False),
    (IntegrityError("INSERT", {}, Exception("dup")), False),
    (ConnectionResetError("reset"), True),
    (TimeoutError("slow"), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (_client_error("SlowDown", 503), True),
    (_client_error("SlowDown", 0), True),
    (_client_error("ServiceUnavailable", 503), True),
    (_client_error("InternalError", 500), True),
    (_client_error("RequestTimeout", 400), True),
    (_client_error("AccessDenied", 403), False),
    (_client_error("NoSuchKey", 404), False),
    (ValueError("x"), False),
])
def test_is_transient_classification(error: BaseException, transient: bool) -> None:
    """Throttling, 5xx, dropped connections and SQL operational errors are transient; the rest are not."""
    assert is_transient(error) is transient


def test_retry_call_retries_s3_slowdown() -> None:
    """An S3 503 SlowDown is retried like a database blip."""
    fn = Flaky([_client_error("SlowDown", 503)], result="stored")
    assert retry_call(fn, attempts=2, base_delay=0.0001) == "stored"
    assert len(fn.calls) == 2

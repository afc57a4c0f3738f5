"""A database that fails for good (a full disk, a damaged or foreign file) is one line naming it, at once: no
retries that cannot help, no driver traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from storage.database import DatabaseError, database_failure, open_database, sqlite_url
from storage.retrying import is_permanent, is_transient, retry_call


def _garbage(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 64)  # 16 KB that is not a database
    return path


def test_a_corrupt_sqlite_file_is_one_line_naming_it(tmp_path: Path) -> None:
    url = sqlite_url(_garbage(tmp_path / "adforge.db"))
    with pytest.raises(DatabaseError) as info:
        open_database(url)
    assert str(info.value) == f"cannot open database {url}: file is not a database"


def _full(url: str):
    """The database, with every new connection unable to grow the file (SQLITE_FULL, as on a full disk)."""
    db = open_database(url)
    with db.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    def cap(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

    event.listen(db.engine, "connect", cap)
    db.engine.dispose()
    return db


def test_a_full_disk_is_permanent_and_not_retried(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "adforge.db")
    db = _full(url)
    calls = []

    def write() -> None:
        calls.append(1)
        with db.session() as s:
            s.execute(text("CREATE TABLE filler (x TEXT)"))
            s.execute(text("INSERT INTO filler VALUES (:x)"), [{"x": "x" * 3000}] * 20)

    with pytest.raises(OperationalError) as info:
        retry_call(write, attempts=4, base_delay=0.01)
    assert len(calls) == 1  # waiting does not free a disk
    assert is_permanent(info.value) and not is_transient(info.value)
    assert str(database_failure(url, info.value)) == f"database {url}: database or disk is full"
    db.dispose()


def test_postgresql_disk_full_is_permanent_and_a_lost_connection_is_not() -> None:
    psycopg = pytest.importorskip("psycopg")
    full = OperationalError("INSERT ...", {}, psycopg.errors.DiskFull("could not extend file: No space left on device"))
    assert is_permanent(full) and not is_transient(full)
    lost = OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection unexpectedly"))
    assert not is_permanent(lost) and is_transient(lost)
    assert str(database_failure("postgresql+psycopg://ada:secret@db/adforge", full)) == \
        "database postgresql+psycopg://ada:***@db/adforge: could not extend file: No space left on device"


def test_a_locked_sqlite_file_is_still_retried(tmp_path: Path) -> None:
    import sqlite3

    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    exc = OperationalError("UPDATE ...", {}, locked)
    assert is_transient(exc) and not is_permanent(exc)

"""Opening the metadata database: engine, sessions, migrations, retries, the audit log.

``open_database(url)`` returns a :class:`Database` whose schema is at the newest Alembic revision (it
upgrades on open, under a lock on PostgreSQL so that parallel workers do not race). SQLite files get WAL
journaling (readers never block the writer, so the gallery can browse while a run records), foreign keys
and a busy timeout.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError as DriverError
from sqlalchemy.orm import Session, sessionmaker

from storage.retrying import retry_call
from storage.schema import AuditEntry
import storage.review_schema  # noqa: F401  (the head revision has the gallery's tables: keep the models complete)

__all__ = ["Database", "DatabaseError", "audit", "database_failure", "open_database", "retry_transient", "shown_url",
           "sqlite_url"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
T = TypeVar("T")


class DatabaseError(RuntimeError):
    pass


def shown_url(url: str) -> str:
    """``url`` as messages show it: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//[^/@]*@", "//***@", url) if isinstance(url, str) else repr(url)


def database_failure(url: str, exc: BaseException) -> DatabaseError:
    """One line naming the database and what went wrong, for an error the driver raised while using it
    (``database sqlite:///data/adforge.db: database or disk is full``)."""
    if isinstance(exc, DatabaseError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines() or [type(orig).__name__]
    return DatabaseError(f"database {shown_url(url)}: {lines[0]}")


def sqlite_url(path: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(path).resolve().as_posix()}"


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


class Database:
    def __init__(self, url: str, engine: Engine):
        self.url = url
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({shown_url(self.url)})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self) -> None:
        cfg = _alembic_config()
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # One migrator at a time when several workers open the same database at once.
                conn.execute(text("SELECT pg_advisory_xact_lock(7340210)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes, fsync per checkpoint
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_database(url: str, *, upgrade: bool = True) -> Database:
    """Connect to ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``) and bring the schema up to date."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        # The URL could not be parsed, so SQLAlchemy cannot hide its password: blank out any user:password@ part.
        shown = re.sub(r"//[^/@]*@", "//***@", url) if isinstance(url, str) else repr(url)
        raise DatabaseError(f"invalid database URL {shown!r}: {exc}") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"cannot create the folder of SQLite database {db}: {exc.strerror or exc}") from None
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # unknown driver and the like
        raise DatabaseError(f"cannot use database URL {parsed.render_as_string(hide_password=True)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    database = Database(url, engine)
    if upgrade:
        try:
            database.upgrade()
        except DriverError as exc:  # unreachable, refused, not a database file, no permission, ...
            engine.dispose()
            raise DatabaseError(f"cannot open database {shown_url(url)}: {str(exc.orig).strip()}") from None
    return database


# ------------------------------------------------------------------------------------------------ retries

def retry_transient(attempts: int = 5, base_delay: float = 0.2) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: retry a whole transaction (the function opens its own session) on transient errors."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> T:
            return retry_call(fn, *args, attempts=attempts, base_delay=base_delay, **kwargs)

        return inner

    return wrap


def audit(session: Session, *, actor: str, action: str, entity: str, entity_id: object, run_id: int | None = None,
          before: dict | None = None, after: dict | None = None) -> AuditEntry:
    """Append one entry to the audit log in the caller's transaction (it commits or rolls back with the change)."""
    entry = AuditEntry(actor=actor, action=action, entity=entity, entity_id=str(entity_id), run_id=run_id,
                       before=before, after=after)
    session.add(entry)
    return entry

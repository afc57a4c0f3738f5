"""Alembic environment: the connection comes from :func:`storage.database.upgrade` (config attribute
``connection``) or, for the ``alembic`` command line, from ``sqlalchemy.url`` / ``ADFORGE_DB_URL``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from storage.schema import Base
import storage.review_schema  # noqa: F401,E402  (registers the gallery's tables on Base.metadata)

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table there.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _configure_and_run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("ADFORGE_DB_URL")
    if not url:
        raise SystemExit("set sqlalchemy.url or ADFORGE_DB_URL")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        with create_engine(url).connect() as conn:
            _configure_and_run(conn)

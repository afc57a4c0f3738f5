"""What several command groups share: option declarations, settings resolution, the audit actor, opening the database.

Settings resolve as everywhere in adforge: flag > environment > adforge.toml > default (``flows.settings``).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail

__all__ = ["CampaignOpt", "BlocklistOpt", "ConfigOpt", "DbOpt", "FastOpt", "ModelOpt", "RefinerOpt", "RefinerSwitchOpt", "ReviewDbOpt", "StoreOpt", "actor", "load_settings", "open_db"]

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="adforge.toml to read (default: ./adforge.toml if present).")]
DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (env ADFORGE_DB_URL). Default: sqlite under ./adforge-data/.")]
# The review commands (gallery, users, export, results, audit) have always shown the shorter help.
ReviewDbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (env ADFORGE_DB_URL).")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Asset store: folder, file:// or s3://bucket/prefix (env ADFORGE_STORE_URL).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Default model for rows without one (env ADFORGE_MODEL). Default: bundled.")]
RefinerOpt = Annotated[str | None, typer.Option(
    "--refiner", help="SDXL refiner checkpoint that finishes every SDXL base render (env ADFORGE_REFINER).")]
RefinerSwitchOpt = Annotated[float | None, typer.Option(
    "--refiner-switch", min=0.01, max=1.0, help="Share of the schedule the base runs before the refiner (default 0.8).")]
FastOpt = Annotated[str | None, typer.Option(
    "--fast", help="Fast mode for images whose channel and brief row set none: cache:N, tome:R, both comma-separated, "
                   "or off. Trades exactness for speed; recorded in each image's identity and infotext.")]
BlocklistOpt = Annotated[str | None, typer.Option(
    "--blocklist", help="Prompt blocklist file (default templates/blocklist.txt; env ADFORGE_BLOCKLIST); "
                        "'off' turns it off (a brief's own blocked_terms still apply).")]
CampaignOpt = Annotated[str, typer.Option("--campaign", "-c", help="Campaign name (or id).")]


def load_settings(config: Path | None, **overrides):
    """The resolved settings (``overrides``: command-line values, None = not given); bad settings exit with 2."""
    from flows.settings import SettingsError, load_settings as resolve

    try:
        return resolve(overrides, config=config)
    except SettingsError as exc:
        raise fail(exc, 2) from None


def open_db(url: str):
    """The metadata database (created or upgraded as needed); one that cannot be opened exits with 2."""
    from storage.database import DatabaseError, open_database

    try:
        return open_database(url)
    except DatabaseError as exc:
        raise fail(exc, 2) from None


def with_database(db: str | None, config, do: Callable, errors: tuple[type[Exception], ...]) -> object:
    """``do(database)`` on the settings' database, disposed after; one of ``errors`` (the user's mistake: no such user,
    bad role, unknown token) is a one-line error, exit 2."""
    settings = load_settings(config, db_url=db)
    database = open_db(settings.db_url)
    try:
        return do(database)
    except errors as exc:
        raise fail(exc, 2) from None
    finally:
        database.dispose()


def actor() -> str:
    """Who the audit log names for an action taken from the command line: ``cli:<login name>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no login name (containers without a passwd entry)
        return f"cli:uid-{os.getuid()}"

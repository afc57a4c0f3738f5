"""Database ids in URLs, one way: paths declare ``Id`` (FastAPI validates it), query strings go through
:func:`parse_id`. Both refuse anything outside 1 .. 2^63-1 before it reaches the database, where a bigger number
raises OverflowError (SQLite) or a DataError (PostgreSQL) instead of "not found"."""

from __future__ import annotations

from typing import Annotated

from fastapi import HTTPException, Path

__all__ = ["Id", "MAX_ID", "parse_id"]

MAX_ID = 2**63 - 1  # BIGINT and SQLite's INTEGER
Id = Annotated[int, Path(ge=1, le=MAX_ID, description="a database id")]


def parse_id(text: str, what: str) -> int:
    """``text`` as an id (ASCII digits, 1 .. 2^63-1), or a 400 naming ``what``."""
    text = text.strip()
    # isascii: str.isdigit accepts "²" and other digits int() refuses. The length check keeps int() off huge strings.
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or not 1 <= int(text) <= MAX_ID:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise HTTPException(400, f"{what} must be an id (1 .. {MAX_ID}), got {shown!r}")
    return int(text)

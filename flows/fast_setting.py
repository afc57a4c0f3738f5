"""The ``fast`` setting of a campaign: which opt-in fast mode (:mod:`engine.fast_modes`: ``cache:3``, ``tome:0.5``,
both comma-separated, or ``off``) a variant renders with.

It can be said in three places, the most specific winning: a brief row's ``fast`` cell, the channel's ``fast:`` key
in ``channels.yaml``, and the run's ``fast`` setting (``adforge run --fast``, ``adforge.toml``). An empty cell (or
a channel without the key) leaves the choice to the next place; ``off`` turns a fast mode of the next place off.

A fast mode trades exactness for speed, so what is stored is its canonical text (``Cache:3 `` is ``cache:3``): the
variant's identity and its infotext carry it, and two spellings of one mode plan the same asset.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.fast_modes import FastMode, FastModeError
from flows.safe_text import quoted

__all__ = ["FAST_COLUMNS", "FastModeError", "canonical_fast", "check_fast", "fast_for"]

FAST_COLUMNS: tuple[str, ...] = ("fast",)
# No mode's text comes near this; a longer cell is refused before it is parsed (and quoted whole in a message).
_MAX_TEXT = 64
_ALLOWED = "cache:N, tome:R, both comma-separated, or off"


def canonical_fast(text: str) -> str:
    """The canonical text of the fast mode ``text`` spells ("" = exact); FastModeError (one line) if it spells none."""
    if len(text) > _MAX_TEXT:
        raise FastModeError(f"fast mode {quoted(text, 40)} is too long to be one ({_ALLOWED})")
    return str(FastMode.parse(text))


def check_fast(values: dict[str, str], bad: Callable[[str, str], None]) -> str | None:
    """A row's ``fast`` cell: None when it is empty (the channel's or run's mode applies), else the canonical text
    ("" for ``off``); a problem goes to ``bad(column, message)``."""
    text = values.get("fast", "")
    if not text.strip():
        return None
    try:
        return canonical_fast(text)
    except FastModeError as exc:
        bad("fast", str(exc))
        return None


def fast_for(row: str | None, channel: str | None, run: str) -> str:
    """The fast mode a variant renders with: the row's cell, else the channel's key, else the run's setting."""
    if row is not None:
        return row
    if channel is not None:
        return channel
    return run

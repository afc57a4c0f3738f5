"""Text that came from a brief, made safe to show on a terminal, in a log line or in a one-line error.

A brief cell can hold an ANSI escape sequence (``ESC [ 2 J`` clears the screen, ``ESC [ 1 A`` moves the cursor
up over earlier output), a carriage return that overwrites a line, or a right-to-left override that shows text
reversed: printed as is, a brief could fake or hide what ``adforge plan`` says. :func:`visible` spells every such
character out as a Python-style escape (``\\x1b``, ``\\u202e``), so the text stays readable and on one line;
:func:`quoted` also shortens a value that would flood a message (a 10,000-character cell).
"""

from __future__ import annotations

import re

__all__ = ["quoted", "visible"]

# C0 controls (tab and newline included: a message is one line), DEL, C1 controls (0x9b is a one-byte CSI on some
# terminals), the bidirectional overrides, isolates and marks, and the line / paragraph separators.
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with control and direction-changing characters written as escapes (``\\x1b``); the rest as is."""
    return _HIDDEN.sub(_escape, text)


def quoted(text: str, limit: int = 60) -> str:
    """``'text'`` for a message: made :func:`visible`, and cut to about ``limit`` characters with the length said."""
    if len(text) > limit:
        return f"'{visible(text[:limit])}...' ({len(text)} characters)"
    return f"'{visible(text)}'"

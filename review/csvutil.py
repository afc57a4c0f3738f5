"""CSV cells that spreadsheets open safely.

A cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return is run as a formula by Excel and
LibreOffice (CSV injection). Such text cells are written with a leading apostrophe, which those programs show as
text; numbers are left alone. The JSON exports carry the exact values.
"""

from __future__ import annotations

import re

__all__ = ["safe_cell"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?([eE][+-]?\d+)?")


def safe_cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value

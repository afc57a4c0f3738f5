"""Reading a results CSV as a stream: one validated row at a time, problems collected under a cap.

A results file comes from an ad platform's export, so it may be large, repeat itself or hold anything. Reading is
bounded whatever the file holds: rows are parsed one line at a time (never the whole text at once), a physical
line longer than :data:`MAX_LINE_CHARS` or a cell over the csv module's field limit stops the read with the
line's number, at most ``max_rows`` data rows are read, and only the first ``max_problems`` problems (in file
order) are kept, with a count of the rest, so an error page stays a page.

Numbers are checked before they reach the database or a sum: counts are whole numbers from 0 to
:data:`MAX_COUNT`, asset ids fit a signed 64-bit integer, and a value shown in a problem is shortened.
"""

from __future__ import annotations

import codecs
import csv
import heapq
import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["MAX_COUNT", "MAX_LINE_CHARS", "MAX_PROBLEMS", "MAX_ROWS", "ParsedResult", "Problems", "ROWS_ENV",
           "default_max_rows", "read_results", "shown"]

MAX_ROWS = 100_000  # data rows per file; ADFORGE_RESULTS_MAX_ROWS changes it
ROWS_ENV = "ADFORGE_RESULTS_MAX_ROWS"
MAX_PROBLEMS = 50
# A count above this is a typo or garbage (10^15 impressions is about 100,000 per person alive), and a cap this low
# keeps every sum of a file's counts (at most MAX_ROWS of them) far inside a signed 64-bit integer.
MAX_COUNT = 10**15
MAX_ASSET_ID = 2**63 - 1  # the database's integer ids are signed 64-bit
MAX_FILE_NAME = 1024
MAX_LINE_CHARS = 1024 * 1024

_ALIASES = {
    "asset_id": "asset_id", "asset": "asset_id", "id": "asset_id",
    "file_name": "file_name", "filename": "file_name", "file": "file_name",
    "impressions": "impressions", "clicks": "clicks", "conversions": "conversions",
}


def default_max_rows() -> int:
    """The row cap: ``ADFORGE_RESULTS_MAX_ROWS`` if set (a whole number >= 1), else :data:`MAX_ROWS`."""
    raw = os.environ.get(ROWS_ENV, "").strip()
    if not raw:
        return MAX_ROWS
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12 and int(raw) >= 1):
        raise ValueError(f"{ROWS_ENV} must be a whole number >= 1, got {shown(raw)}")
    return int(raw)


@dataclass(frozen=True)
class ParsedResult:
    line: int
    asset_id: int | None
    file_name: str | None
    impressions: int
    clicks: int
    conversions: int


def shown(value: str, limit: int = 60) -> str:
    """``value`` quoted for a problem line, cut to ``limit`` characters (a 100 KB cell must not make a 100 KB page)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class Problems:
    """A file's problems in file order: the first ``cap`` are kept, the rest only counted."""

    def __init__(self, source: str, cap: int = MAX_PROBLEMS):
        self.source = source
        self.cap = max(1, cap)
        self.total = 0
        self.repeats = 0  # rows naming an asset that an earlier row named
        self._heap: list[tuple[int, int, str]] = []  # (-line, -seq, text): the largest line is popped first
        self._seq = itertools.count()
        self._stopped: str | None = None  # why reading stopped early: always listed, whatever the cap kept

    def stop(self, line: int, text: str) -> None:
        """The problem that ended the read (the row cap, an unreadable line)."""
        self.total += 1
        self._stopped = f"{self.source}:{line}: {text}" if line else f"{self.source}: {text}"

    def add(self, line: int, text: str, *, repeat: bool = False) -> None:
        self.total += 1
        self.repeats += repeat
        item = (-line, -next(self._seq), f"{self.source}:{line}: {text}" if line else f"{self.source}: {text}")
        if len(self._heap) < self.cap:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:  # earlier in the file than the latest kept problem
            heapq.heapreplace(self._heap, item)

    def __bool__(self) -> bool:
        return self.total > 0

    def lines(self) -> list[str]:
        kept = [text for _, _, text in sorted(self._heap, reverse=True)]
        more = self.total - len(kept) - (self._stopped is not None)
        if more:
            kept.append(f"... and {more} more problem(s) not listed")
        if self.repeats > 1:
            kept.append(f"{self.repeats} row(s) name an asset an earlier row already named: list each asset once per file")
        if self._stopped is not None:
            kept.append(self._stopped)
        return kept


def _count(text: str) -> int | None:
    """A count's value, or None when it is not a whole number >= 0 written in digits (a sign, a decimal point,
    letters). Underscores group digits (1_000)."""
    digits = text.replace("_", "")
    if not (digits.isascii() and digits.isdigit()):
        return None
    digits = digits.lstrip("0") or "0"
    # Compare lengths before converting: a 5000-digit cell would hit Python's int digit limit.
    return int(digits) if len(digits) <= 19 else MAX_ASSET_ID + 1


class _Unreadable(Exception):
    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


class _Lines:
    """The file's physical lines as text, counted, each at most MAX_LINE_CHARS long (one 50 MB line without a
    newline stops here, not in memory). UTF-8 is decoded line by line, so a bad byte is reported on its own line."""

    def __init__(self, data: bytes | BinaryIO):
        raw = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        self._raw = raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[arg-type]
        head = self._raw.peek(2)[:2]  # type: ignore[union-attr]
        self.number = 0
        # Spreadsheets on Windows save "Unicode text" as UTF-16 with a byte-order mark.
        self._utf16 = head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        if self._utf16:
            self._text = io.TextIOWrapper(self._raw, encoding="utf-16", newline="")  # type: ignore[arg-type]
        else:
            self._decoder = codecs.getincrementaldecoder("utf-8-sig")()

    def __iter__(self) -> Iterator[str]:
        while True:
            line = self._next()
            if not line:
                return
            self.number += 1
            if len(line) > MAX_LINE_CHARS:
                raise _Unreadable(self.number, f"line longer than {MAX_LINE_CHARS} characters: not a results file")
            yield line

    def _next(self) -> str:
        if self._utf16:
            try:
                return self._text.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError:
                raise _Unreadable(self.number + 1, "not UTF-16 text (the file starts with a UTF-16 byte-order mark)") from None
        raw = self._raw.readline(MAX_LINE_CHARS + 1)
        try:
            return self._decoder.decode(raw, final=not raw)
        except UnicodeDecodeError:
            raise _Unreadable(self.number + 1, "not UTF-8 text") from None


def read_results(data: bytes | BinaryIO, source: str, problems: Problems, *, max_rows: int | None = None
                 ) -> Iterator[ParsedResult]:
    """The rows that read well, one at a time; the others' problems go to ``problems``. A bad header, an
    unreadable line or more than ``max_rows`` data rows end the stream (with a problem saying so)."""
    limit = default_max_rows() if max_rows is None else max_rows
    lines = _Lines(data)
    try:
        stream = iter(lines)
        first = next(stream, "")
        if not first.strip():
            problems.add(0, "empty file")
            return
        sample = first[:4096]
        delimiter = ";" if sample.count(";") > sample.count(",") else ","  # European spreadsheet exports use ';'
        # The csv module, not pandas.read_csv: problems name the file's lines, and read_csv rejects a row with
        # more cells than the header (extra cells are ignored here) and a quote left open at the end of the file.
        reader = csv.reader(itertools.chain([first], stream), delimiter=delimiter)
        header = next(reader, None) or []
        columns = [_ALIASES.get(_norm(h)) for h in header]
        if "asset_id" not in columns and "file_name" not in columns:
            problems.add(1, "needs an 'asset_id' or a 'file_name' column")
        for needed in ("impressions", "clicks"):
            if needed not in columns:
                problems.add(1, f"missing column '{needed}'")
        if problems:
            return
        rows = 0
        while True:
            line = lines.number + 1  # where the next record starts (a quoted cell may span lines)
            cells = next(reader, None)
            if cells is None:
                return
            if not any(c.strip() for c in cells):
                continue
            rows += 1
            if rows > limit:
                problems.stop(line, f"more than {limit} data rows, the limit for one results file ({ROWS_ENV} sets it): "
                                    "split the file")
                return
            parsed = _row(line, cells, columns, problems)
            if parsed is not None:
                yield parsed
    except _Unreadable as exc:
        problems.stop(exc.line, exc.reason)
    except csv.Error as exc:
        # A cell over the csv module's field limit (131,072 characters), a NUL byte: the reader cannot go on.
        reason = (f"a cell longer than {csv.field_size_limit()} characters" if "field limit" in str(exc)
                  else f"unreadable CSV: {exc}")
        problems.stop(max(lines.number, 1), reason)


def _norm(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _row(line: int, cells: list[str], columns: list[str | None], problems: Problems) -> ParsedResult | None:
    values = {col: (cells[i].strip() if i < len(cells) else "") for i, col in enumerate(columns) if col}
    counts: dict[str, int] = {}
    bad = False
    for name in ("impressions", "clicks", "conversions"):
        raw = values.get(name, "") or ("0" if name == "conversions" else "")
        value = _count(raw)
        if value is None:
            problems.add(line, f"column '{name}': {shown(raw)} is not a whole number >= 0")
        elif value > MAX_COUNT:
            problems.add(line, f"column '{name}': {shown(raw)} is above the limit of 10^15")
        else:
            counts[name] = value
    asset_id: int | None = None
    if values.get("asset_id"):
        raw = values["asset_id"]
        value = _count(raw)
        if value is None:
            problems.add(line, f"column 'asset_id': {shown(raw)} is not an asset id")
            bad = True
        elif value > MAX_ASSET_ID:
            problems.add(line, f"column 'asset_id': {shown(raw)} is too large to be an asset id")
            bad = True
        else:
            asset_id = value
    file_name = values.get("file_name") or None
    if file_name is not None and len(file_name) > MAX_FILE_NAME:
        problems.add(line, f"column 'file_name': {shown(file_name)} is longer than {MAX_FILE_NAME} characters")
        file_name, bad = None, True
    if asset_id is None and file_name is None and not bad and len(counts) == 3:
        problems.add(line, "neither asset_id nor file_name given")
        return None
    if len(counts) < 3 or (asset_id is None and file_name is None):
        return None
    if counts["clicks"] > counts["impressions"]:
        problems.add(line, f"{counts['clicks']} clicks but only {counts['impressions']} impressions")
    if counts["conversions"] > counts["impressions"]:
        problems.add(line, f"{counts['conversions']} conversions but only {counts['impressions']} impressions")
    return ParsedResult(line, asset_id, file_name, counts["impressions"], counts["clicks"], counts["conversions"])

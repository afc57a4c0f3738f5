"""The first worksheet of an .xlsx brief as rows of text, read as a stream under the brief's limits.

An .xlsx is a zip of XML parts. openpyxl reads a part whole before it looks at it (the shared strings at load time,
each row element with its text), so a 310 KB file holding a 300 MB cell costs gigabytes before anything could
refuse it. Here the zip's directory is checked first (the unpacked size it declares is all :mod:`zipfile` will ever
return: it stops there and fails the CRC), then each part goes through expat in chunks, counting characters as they
arrive: the first cell, row or string past a cap stops the read with its sheet, cell reference, line and column.
openpyxl still supplies what Excel's number formats mean (which are dates) and the date arithmetic.

Values are what Excel shows when it opens the file: a formula cell gives the result saved with it. A formula saved
without a result (a file written by a program that does not calculate) reads as empty, with a warning naming the
cell.
"""

from __future__ import annotations

import datetime as _dt
import io
import posixpath
import re
import zipfile
from collections.abc import Callable, Iterator
from xml.parsers import expat

from flows.brief_limits import RecordGuard, setting
from flows.brief_problems import BriefError, BriefProblem
from flows.safe_text import quoted

__all__ = ["XlsxSheet", "cell_text"]

CHUNK = 64 * 1024
MAX_WARNINGS = 50  # formula warnings listed one by one; past this, one line counts the rest
_REF = re.compile(r"([A-Z]{1,3})([0-9]{1,7})")
_INTEGER = re.compile(r"([+-]?)0*([0-9]+)")
_Row = tuple[int, list[str]]


class _Unreadable(Exception):
    """The workbook's structure is broken (a missing part, a bad reference): reported as not a readable .xlsx."""


def cell_text(value: object) -> str:
    """A cell's value as the brief sees it: whole floats without ``.0``, dates as ISO dates."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, _dt.datetime) and value.time() == _dt.time():
        return value.date().isoformat()
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    return str(value)


def _column_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + ord(ch) - 64
    return n - 1


def _column_letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def _local(name: str) -> str:
    return name.rpartition("}")[2]


def _refuse_dtd(*_args: object) -> None:
    # OOXML parts never declare a DTD; refusing one rules out entity expansion ("billion laughs").
    raise _Unreadable("an XML part declares a DTD")


def _parse(zf: zipfile.ZipFile, part: str, start: Callable, end: Callable | None = None,
           chars: Callable | None = None) -> Iterator[None]:
    """Feed ``part`` to expat chunk by chunk; yields after each chunk so that a caller can hand rows on."""
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.StartElementHandler = lambda name, attrs: start(_local(name), {_local(k): v for k, v in attrs.items()})
    if end is not None:
        parser.EndElementHandler = lambda name: end(_local(name))
    if chars is not None:
        parser.CharacterDataHandler = chars
    try:
        source = zf.open(part)
    except KeyError:
        raise _Unreadable(f"part {part} is missing") from None
    with source:
        while chunk := source.read(CHUNK):
            parser.Parse(chunk, False)
            yield
        parser.Parse(b"", True)


def _drain(parse: Iterator[None]) -> None:
    for _ in parse:
        pass


def _relationships(zf: zipfile.ZipFile, part: str) -> dict[str, tuple[str, str]]:
    """``part``'s relationships: id -> (type's last word, target part)."""
    folder, name = posixpath.split(part)
    rels: dict[str, tuple[str, str]] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        if tag == "Relationship" and attrs.get("TargetMode") != "External" and "Target" in attrs:
            target = attrs["Target"]
            target = target.lstrip("/") if target.startswith("/") else posixpath.normpath(posixpath.join(folder, target))
            rels[attrs.get("Id", "")] = (attrs.get("Type", "").rpartition("/")[2], target)

    _drain(_parse(zf, posixpath.join(folder, "_rels", f"{name}.rels"), start))
    return rels


class XlsxSheet:
    """The first worksheet of the workbook in ``data``; :meth:`rows` streams it, :attr:`warnings` says what read as
    empty without being empty, :attr:`width` is the widest row seen."""

    def __init__(self, data: bytes, file: str, guard: RecordGuard):
        self.file = file
        self.guard = guard
        self.warnings: list[BriefProblem] = []
        self.width = 0
        self._unsaved = 0
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            self._check_sizes()
            self._open_workbook()
        except BriefError:
            raise
        except (zipfile.BadZipFile, _Unreadable, expat.ExpatError, KeyError, ValueError, RuntimeError, OSError,
                EOFError, NotImplementedError) as exc:
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: BaseException) -> BriefError:
        return BriefError([BriefProblem(self.file, None, None, f"cannot read file: not a readable .xlsx workbook ({exc})")])

    def _check_sizes(self) -> None:
        parts = self.zip.infolist()
        total = sum(i.file_size for i in parts)
        cap = self.guard.limits.max_xlsx_bytes
        if total > cap:
            largest = max(parts, key=lambda i: i.file_size)
            raise BriefError([BriefProblem(
                self.file, None, None,
                f"cannot read file: the workbook unpacks to {total} bytes ({quoted(largest.filename)} alone "
                f"{largest.file_size}), more than the {cap} allowed (setting {setting('max_xlsx_bytes')})")])

    def _open_workbook(self) -> None:
        package = _relationships(self.zip, "")
        workbook = next((target for kind, target in package.values() if kind == "officeDocument"), None)
        if workbook is None:
            raise _Unreadable("no workbook part")
        sheets: list[tuple[str, str]] = []
        self.date1904 = False

        def start(tag: str, attrs: dict[str, str]) -> None:
            if tag == "sheet":
                sheets.append((attrs.get("name", ""), attrs.get("id", "")))
            elif tag == "workbookPr":
                self.date1904 = attrs.get("date1904", "").lower() in ("1", "true")

        _drain(_parse(self.zip, workbook, start))
        rels = _relationships(self.zip, workbook)
        found = [(name, rels[rid][1]) for name, rid in sheets if rels.get(rid, ("",))[0] == "worksheet"]
        if not found:
            raise _Unreadable("the workbook has no worksheet")
        self.sheet_name, self.sheet_part = found[0]
        parts = {kind: target for kind, target in rels.values()}
        self.strings = self._read_strings(parts["sharedStrings"]) if "sharedStrings" in parts else []
        self.date_styles, self.timedelta_styles = self._read_styles(parts.get("styles"))

    def _read_strings(self, part: str) -> list[str | None]:
        """The shared strings; None stands for one longer than a cell may be (never kept: a cell using it is refused)."""
        cap, most = self.guard.limits.max_cell_chars, self.guard.limits.max_cells
        strings: list[str | None] = []
        state = {"t": False, "rph": 0, "n": 0}
        pieces: list[str] = []

        def start(tag: str, attrs: dict[str, str]) -> None:
            if tag == "si":
                pieces.clear()
                state["n"] = 0
            elif tag == "rPh":  # phonetic reading (furigana): not part of the value
                state["rph"] += 1
            elif tag == "t" and not state["rph"]:
                state["t"] = True

        def end(tag: str) -> None:
            if tag == "t":
                state["t"] = False
            elif tag == "rPh":
                state["rph"] -= 1
            elif tag == "si":
                strings.append(None if state["n"] > cap else "".join(pieces))
                if len(strings) > most:  # more strings than cells can use: not a brief
                    raise BriefError([BriefProblem(self.file, None, None, (
                        f"cannot read file: the workbook holds more than {most} shared strings, the cell limit "
                        f"(setting {setting('max_cells')})"))])

        def chars(text: str) -> None:
            if state["t"]:
                state["n"] += len(text)
                if state["n"] <= cap:
                    pieces.append(text)
                else:
                    pieces.clear()

        _drain(_parse(self.zip, part, start, end, chars))
        return strings

    def _read_styles(self, part: str | None) -> tuple[set[int], set[int]]:
        """Which cell styles (``s``) show numbers as dates, and which as durations."""
        if part is None or part not in self.zip.namelist():
            return set(), set()
        from openpyxl.styles.numbers import builtin_format_code, is_date_format, is_timedelta_format

        custom: dict[int, str] = {}
        formats: list[int] = []
        inside = {"cellXfs": False}

        def start(tag: str, attrs: dict[str, str]) -> None:
            if tag == "numFmt" and attrs.get("numFmtId", "").isdigit():
                custom[int(attrs["numFmtId"])] = attrs.get("formatCode", "")
            elif tag == "cellXfs":
                inside["cellXfs"] = True
            elif tag == "xf" and inside["cellXfs"]:
                code = attrs.get("numFmtId", "0")
                formats.append(int(code) if code.isdigit() and len(code) < 10 else 0)

        def end(tag: str) -> None:
            if tag == "cellXfs":
                inside["cellXfs"] = False

        _drain(_parse(self.zip, part, start, end))
        dates, durations = set(), set()
        for index, fid in enumerate(formats):
            code = custom.get(fid) or builtin_format_code(fid)
            if code and is_date_format(code):
                dates.add(index)
            if code and is_timedelta_format(code):
                durations.add(index)
        return dates, durations

    # ------------------------------------------------------------------------------------------------ the sheet

    def rows(self) -> Iterator[_Row]:
        """(sheet row number, stripped cell texts) for every row with a value, as the sheet's XML arrives; each row
        has passed the guard (:meth:`RecordGuard.take`) before it is handed on."""
        try:
            yield from self._rows()
        except BriefError:
            raise
        except (zipfile.BadZipFile, _Unreadable, expat.ExpatError, ValueError, RuntimeError, OSError, EOFError) as exc:
            raise self._unreadable(exc) from None

    def _rows(self) -> Iterator[_Row]:
        guard, cap = self.guard, self.guard.limits.max_cell_chars
        pending: list[_Row] = []
        row: dict[int, str] = {}
        at = {"line": 0, "col": -1}
        cell: dict = {}

        def where() -> str:
            return f"sheet {quoted(self.sheet_name)} cell {cell['ref']}: "

        def start(tag: str, attrs: dict[str, str]) -> None:
            if tag == "row":
                r = attrs.get("r", "")
                at["line"] = int(r) if r.isdigit() and len(r) < 8 else at["line"] + 1
                at["col"] = -1
                row.clear()
            elif tag == "c":
                match = _REF.fullmatch(attrs.get("r", ""))
                at["col"] = _column_index(match.group(1)) if match else at["col"] + 1
                if at["col"] >= 16384:
                    raise _Unreadable(f"cell {attrs.get('r')!r} is outside a worksheet")
                style = attrs.get("s", "0")
                cell.clear()
                cell.update(ref=_column_letters(at["col"]) + str(at["line"]), type=attrs.get("t", "n"), n=0, text=[],
                            style=int(style) if style.isdigit() and len(style) < 10 else 0, formula=None, rph=0, into=None)
            elif tag in ("v", "f") and cell:
                cell["into"] = tag
                if tag == "f":
                    cell["formula"] = []
            elif tag == "rPh" and cell:
                cell["rph"] += 1
            elif tag == "t" and cell and not cell["rph"]:
                cell["into"] = "t"

        def end(tag: str) -> None:
            if tag in ("v", "f", "t") and cell:
                cell["into"] = None
            elif tag == "rPh" and cell:
                cell["rph"] -= 1
            elif tag == "c" and cell:
                self._end_cell(cell, at["line"], at["col"], row, where)
                cell.clear()
            elif tag == "row" and row:
                width = max(row) + 1
                guard.check_width(at["line"], width)
                cells = [""] * width
                for col, text in row.items():
                    cells[col] = text.strip()
                if any(cells):
                    guard.take(at["line"], cells)  # the header first: later problems name their column
                    self.width = max(self.width, width)
                    pending.append((at["line"], cells))

        def chars(text: str) -> None:
            into = cell.get("into") if cell else None
            if into == "f":
                if sum(map(len, cell["formula"])) < 200:  # enough to recognise it in a warning
                    cell["formula"].append(text)
            elif into is not None:
                cell["n"] += len(text)
                if cell["n"] > cap:
                    raise guard.cell_too_long(at["line"], at["col"], where())
                cell["text"].append(text)

        for _ in _parse(self.zip, self.sheet_part, start, end, chars):
            yield from pending
            pending.clear()
        yield from pending
        if self._unsaved > MAX_WARNINGS:
            self.warnings.append(BriefProblem(self.file, None, None, (
                f"and {self._unsaved - MAX_WARNINGS} more formula cells without a saved value, read as empty")))

    def _end_cell(self, cell: dict, line: int, col: int, row: dict[int, str], where: Callable[[], str]) -> None:
        raw = "".join(cell["text"])
        kind = cell["type"]
        if cell["formula"] is not None and not raw and kind != "inlineStr":
            self._unsaved += 1
            if self._unsaved <= MAX_WARNINGS:
                formula = quoted("=" + "".join(cell["formula"]))
                self.warnings.append(BriefProblem(self.file, line, self.guard.column(col), (
                    f"{where()}formula {formula} has no saved value and reads as empty (open and save the "
                    "workbook in Excel to store its result, or type the value)")))
            return
        text = self._value(kind, raw, cell["style"], line, col, where)
        if text:
            if col not in row:
                self.guard.check_width(line, len(row) + 1)
            row[col] = text

    def _value(self, kind: str, raw: str, style: int, line: int, col: int, where: Callable[[], str]) -> str:
        if not raw:
            return ""
        if kind == "s":
            index = int(raw) if raw.isdigit() and len(raw) < 10 else -1
            if not 0 <= index < len(self.strings):
                raise _Unreadable(f"{where()}shared string {raw[:12]!r} does not exist")
            text = self.strings[index]
            if text is None:
                raise self.guard.cell_too_long(line, col, where())
            return text
        if kind == "b":
            return "TRUE" if raw.strip() not in ("0", "") else "FALSE"
        if kind == "d":
            from openpyxl.utils.datetime import from_ISO8601

            return cell_text(from_ISO8601(raw))
        if kind != "n":  # inlineStr, str (a formula's text), e (an error such as #N/A)
            return raw
        if style in self.date_styles:
            from openpyxl.utils.datetime import CALENDAR_MAC_1904, CALENDAR_WINDOWS_1900, from_excel

            try:
                return cell_text(from_excel(float(raw), CALENDAR_MAC_1904 if self.date1904 else CALENDAR_WINDOWS_1900,
                                            timedelta=style in self.timedelta_styles))
            except (OverflowError, ValueError):
                return "#VALUE!"  # what openpyxl (and Excel) show for a serial outside the calendar
        whole = _INTEGER.fullmatch(raw)
        if whole:  # kept as text: int() of a 5000-digit cell would raise
            digits = whole.group(2)
            return digits if digits == "0" or whole.group(1) != "-" else "-" + digits
        try:
            return cell_text(float(raw))
        except ValueError:
            return raw

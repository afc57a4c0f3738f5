"""Reading and validating campaign briefs (``.csv`` / ``.xlsx``).

A brief is a spreadsheet with a header row and one row per creative request.
Header names are matched case-insensitively after stripping; spaces, ``_`` and
``-`` are equivalent (``Row ID``, ``row-id`` and ``ROW_ID`` all mean ``row_id``).

Canonical columns
-----------------
required
    ``campaign``   campaign name.
    ``row_id``     identifier of the row, unique within the brief (compared case-insensitively,
                   since it ends up in file names).
    ``subject``    the product / subject to draw.
    ``channels``   channel names separated by ``,`` or ``;`` (``instagram_square, story``);
                   lower-cased, spaces and ``-`` become ``_``; duplicates dropped.
optional
    ``message``          message or scene (default empty).
    ``audience``         target audience (default empty).
    ``style``            visual style (default empty).
    ``variants``         images per channel, a positive whole number (default 4).
    ``negative_prompt``  negative prompt (default empty).
    ``seed``             base seed, a whole number in ``0 .. 2**63 - 1``; default
                         :func:`derive_seed` (campaign, row_id), stable across runs.
    ``model``            model name or path (empty = the configured default, ``None``).
    ``license``          licence constraint on the model: ``commercial`` (default) or ``any``.

Any other column is kept per row in :attr:`BriefRow.extra` (key = normalised header name,
value = stripped text) for use as a template variable.

Every cell is read as text; nothing is converted behind the user's back (``007`` stays ``007``).
In ``.xlsx`` files numbers that Excel stores as whole floats (``4.0``) count as whole numbers.
CSV files are decoded as UTF-8 (with or without BOM), falling back to cp1252 (Excel on Windows);
:attr:`Brief.encoding` says which was used. The delimiter is ``;`` when the header line has more
``;`` than ``,`` (European Excel exports), otherwise ``,``. Blank lines/rows are skipped; line
numbers are physical (header = line 1 when the file starts with it; for ``.xlsx`` the sheet row).

Validation collects every problem. Rows with problems are left out of :attr:`Brief.rows`. A
file-level problem (unreadable, unsupported type, empty, header broken, required column missing)
always raises :class:`BriefError`; with ``strict=True`` any problem does.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Brief",
    "BriefError",
    "BriefProblem",
    "BriefRow",
    "DEFAULT_LICENSE",
    "DEFAULT_VARIANTS",
    "LICENSES",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "derive_seed",
    "normalize_name",
    "read_brief",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("campaign", "row_id", "subject", "channels")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "message",
    "audience",
    "style",
    "variants",
    "negative_prompt",
    "seed",
    "model",
    "license",
)
LICENSES: tuple[str, ...] = ("commercial", "any")
DEFAULT_LICENSE = "commercial"
DEFAULT_VARIANTS = 4
SEED_LIMIT = 2**63  # seeds must be below this (torch.Generator.manual_seed takes int64)
SUPPORTED_SUFFIXES = (".csv", ".xlsx")

_SEP = re.compile(r"[\s_\-]+")
_WHOLE = re.compile(r"[+-]?[0-9]+")


def normalize_name(name: str) -> str:
    """Header / channel name normalisation: strip, lower-case, runs of space ``_`` ``-`` -> ``_``."""
    return _SEP.sub("_", name.strip().lower()).strip("_")


def derive_seed(campaign: str, row_id: str) -> int:
    """Default seed of a row: first 4 bytes of sha256(``campaign`` NUL ``row_id``), big-endian, below 2**31."""
    digest = hashlib.sha256(f"{campaign}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class BriefRow:
    campaign: str
    row_id: str
    subject: str
    channels: tuple[str, ...]
    message: str
    audience: str
    style: str
    variants: int
    negative_prompt: str
    seed: int
    model: str | None
    license: str
    extra: dict[str, str]
    line: int  # 1-based line (CSV) / sheet row (XLSX) where the row starts


@dataclass(frozen=True)
class BriefProblem:
    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        col = "" if self.column is None else f" column '{self.column}':"
        return f"{where}:{col} {self.message}"


@dataclass
class Brief:
    path: Path
    sha256: str
    rows: list[BriefRow]
    problems: list[BriefProblem]
    encoding: str | None = None  # "utf-8" / "utf-8-sig" / "cp1252" for CSV, None for XLSX
    columns: tuple[str, ...] = field(default=())  # normalised header names, in file order


class BriefError(ValueError):
    """A brief that cannot be used; ``problems`` holds every problem found, ``str()`` lists one per line."""

    def __init__(self, problems: Sequence[BriefProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- reading


def _decode(data: bytes, file: str) -> tuple[str, str]:
    if b"\x00" in data:
        raise BriefError([BriefProblem(file, None, None, "cannot read file: it is binary, not CSV text")])
    try:
        text = data.decode("utf-8-sig")
        return text, ("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError as exc:
        raise BriefError(
            [BriefProblem(file, None, None, f"cannot read file: neither UTF-8 nor cp1252 text (byte {exc.start})")]
        ) from None


# Briefs are read with the csv module and openpyxl, not pandas: every message names a physical line, and
# pandas.read_csv numbers records (a quoted cell spanning lines would shift every later line), rejects a row with more
# cells than the header (reported here per row) and a quote left open at the end of the file (kept here as text);
# pandas.read_excel turns formula errors (#N/A, #DIV/0!) into NaN, so a bad cell would pass as an empty one, and drops
# a sheet's empty trailing columns (still in Brief.columns).
def _read_csv(data: bytes, file: str) -> tuple[list[tuple[int, list[str]]], str]:
    text, encoding = _decode(data, file)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for cells in reader:
            records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise BriefError([BriefProblem(file, start, None, f"cannot parse CSV: {exc}")]) from None
    return records, encoding


def _cell_text(value: object) -> str:
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


def _read_xlsx(path: Path, file: str) -> list[tuple[int, list[str]]]:
    import openpyxl  # only needed for .xlsx

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # zipfile.BadZipFile, KeyError, InvalidFileException, ...
        problem = BriefProblem(file, None, None, f"cannot read file: not a readable .xlsx workbook ({exc})")
        raise BriefError([problem]) from None
    try:
        if not wb.worksheets:
            return []
        return [
            (n, [_cell_text(v) for v in values])
            for n, values in enumerate(wb.worksheets[0].iter_rows(values_only=True), start=1)
        ]
    finally:
        wb.close()


# --------------------------------------------------------------------------- validation


def _whole(text: str, *, lenient_float: bool) -> int | None:
    if _WHOLE.fullmatch(text):
        return int(text)
    if lenient_float and re.fullmatch(r"[+-]?[0-9]+\.0*", text):
        return int(text.split(".")[0])
    return None


def _split_channels(text: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for part in re.split(r"[,;]", text):
        name = normalize_name(part)
        if name:
            seen.setdefault(name, None)
    return tuple(seen)


def read_brief(
    path: str | os.PathLike[str],
    *,
    known_channels: Collection[str] | None = None,
    strict: bool = False,
) -> Brief:
    """Read and validate a brief; see the module docstring for columns and rules."""
    path = Path(path)
    file = os.fspath(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise BriefError(
            [BriefProblem(file, None, None, f"unsupported file type '{path.suffix}' (expected .csv or .xlsx)")]
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BriefError([BriefProblem(file, None, None, f"cannot read file: {exc.strerror or exc}")]) from None
    sha256 = hashlib.sha256(data).hexdigest()

    if suffix == ".csv":
        records, encoding = _read_csv(data, file)
    else:
        records, encoding = _read_xlsx(path, file), None
    records = [(line, [c.strip() for c in cells]) for line, cells in records]
    records = [(line, cells) for line, cells in records if any(cells)]
    if not records:
        raise BriefError([BriefProblem(file, None, None, "file is empty: no header row")])

    # ---- header
    header_line, raw_header = records[0]
    body = records[1:]
    file_problems: list[BriefProblem] = []
    columns: list[str] = [normalize_name(h) for h in raw_header]
    first_at: dict[str, int] = {}
    for i, name in enumerate(columns):
        if not name:
            if any(i < len(cells) and cells[i] for _, cells in body):
                file_problems.append(BriefProblem(file, header_line, None, f"column {i + 1} has values but no header"))
        elif name in first_at:
            file_problems.append(
                BriefProblem(file, header_line, name, f"appears twice (columns {first_at[name] + 1} and {i + 1})")
            )
        else:
            first_at[name] = i
    for name in REQUIRED_COLUMNS:
        if name not in first_at:
            file_problems.append(BriefProblem(file, None, name, "required column is missing"))
    if not body and not file_problems:
        file_problems.append(BriefProblem(file, None, None, "brief has a header but no rows"))
    if file_problems:
        raise BriefError(file_problems)

    known = None if known_channels is None else {normalize_name(c) for c in known_channels}
    lenient = suffix == ".xlsx"
    problems: list[BriefProblem] = []
    candidates: list[BriefRow] = []
    id_lines: dict[str, int] = {}
    duplicated: set[str] = set()

    for line, cells in body:
        row_problems: list[BriefProblem] = []

        def bad(column: str | None, message: str) -> None:
            row_problems.append(BriefProblem(file, line, column, message))

        if len(cells) > len(columns) and any(cells[len(columns) :]):
            bad(None, f"row has {len(cells)} cells but the header has {len(columns)} columns")
        values = {name: (cells[i] if i < len(cells) else "") for name, i in first_at.items()}

        for name in REQUIRED_COLUMNS:
            if not values[name]:
                bad(name, "required value is empty")

        channels = _split_channels(values["channels"])
        if values["channels"] and not channels:
            bad("channels", "no channel names given")
        if known is not None:
            for ch in channels:
                if ch not in known:
                    bad("channels", f"unknown channel '{ch}' (known: {', '.join(sorted(known))})")

        variants = DEFAULT_VARIANTS
        text = values.get("variants", "")
        if text:
            n = _whole(text, lenient_float=lenient)
            if n is None:
                bad("variants", f"'{text}' is not a whole number")
            elif n < 1:
                bad("variants", f"'{text}' must be at least 1")
            else:
                variants = n

        seed: int | None = None
        text = values.get("seed", "")
        if text:
            n = _whole(text, lenient_float=lenient)
            if n is None:
                bad("seed", f"'{text}' is not a whole number")
            elif n < 0:
                bad("seed", f"'{text}' must not be negative")
            elif n >= SEED_LIMIT:
                bad("seed", f"'{text}' is too large (must be below 2**63)")
            else:
                seed = n

        licence = values.get("license", "").lower() or DEFAULT_LICENSE
        if licence not in LICENSES:
            bad("license", f"unknown licence '{values['license']}' (expected 'commercial' or 'any')")

        row_id = values["row_id"]
        if row_id:
            key = row_id.casefold()
            if key in id_lines:
                duplicated.add(key)
                bad("row_id", f"duplicate row_id '{row_id}' (also on line {id_lines[key]})")
            else:
                id_lines[key] = line

        problems.extend(row_problems)
        if row_problems:
            continue
        candidates.append(
            BriefRow(
                campaign=values["campaign"],
                row_id=row_id,
                subject=values["subject"],
                channels=channels,
                message=values.get("message", ""),
                audience=values.get("audience", ""),
                style=values.get("style", ""),
                variants=variants,
                negative_prompt=values.get("negative_prompt", ""),
                seed=derive_seed(values["campaign"], row_id) if seed is None else seed,
                model=values.get("model", "") or None,
                license=licence,
                extra={k: v for k, v in values.items() if k not in REQUIRED_COLUMNS and k not in OPTIONAL_COLUMNS},
                line=line,
            )
        )

    if strict and problems:
        raise BriefError(problems)
    # A duplicated row_id makes every row carrying it ambiguous: none of them is used.
    rows = [r for r in candidates if r.row_id.casefold() not in duplicated]
    return Brief(path=path, sha256=sha256, rows=rows, problems=problems, encoding=encoding, columns=tuple(columns))

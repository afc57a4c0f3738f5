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
    ``product_image``    a packshot kept pixel-exact in every image of the row: a PNG with transparency, or any image
                         with ``product_mask`` (white = product). Paths are relative to the brief's folder.
    ``product_mask``     the product's mask for a ``product_image`` without transparency.
    ``placement``        where the product goes: ``ANCHOR[:SCALE[:MARGIN[:SHADOW]]]`` (anchors centre, left_third,
                         right_third, bottom; :class:`engine.packshot.Placement`); default: the channel's
                         ``product:`` settings in channels.yaml.
    ``control_image``    a layout image for ControlNet (a sketch, line art, depth or pose map, or a photo to take
                         edges from), relative to the brief's folder.
    ``control_type``     what the control image is: canny, softedge (edges taken from it), lineart, scribble,
                         depth, pose (used as it is).
    ``control_strength`` the ControlNet's weight (default 1), ``control_start`` / ``control_end`` the share of the
                         sampling steps it acts on (default 0 and 1).
    ``brand``, ``headline``, ``body``, ``cta``  a brand kit and the copy its overlay draws (:mod:`flows.brand.cells`).
    ``fast``             a fast mode (``cache:3``, ``tome:0.5``, both, or ``off``) overriding the channel's and the
                         run's (:mod:`flows.fast_setting`); default: theirs.
    ``blocked_terms``    terms (``;`` / ``,`` separated) no prompt of any row of the row's campaign may hold, on top of
                         the ``blocklist`` setting's; every text cell that can reach a prompt is checked against both
                         (:mod:`flows.content_filter`), a hit is a problem naming the term.

Image files are read and checked when the brief is planned (:mod:`flows.input_images`), not here.

Any other column is kept per row in :attr:`BriefRow.extra` (key = normalised header name,
value = stripped text) for use as a template variable.

Every cell is read as text; nothing is converted behind the user's back (``007`` stays ``007``).
In ``.xlsx`` files numbers that Excel stores as whole floats (``4.0``) count as whole numbers, and a
formula cell gives the result saved with it; one saved without a result reads as empty, with a warning
(:attr:`Brief.warnings`) naming the sheet and cell (:mod:`flows.xlsx_reader`).
CSV files are decoded as UTF-16 when they start with its byte-order mark, else as UTF-8 (with or
without BOM), falling back to cp1252 (Excel on Windows); :attr:`Brief.encoding` says which was used.
The delimiter is ``;`` when the header line has more ``;`` than ``,`` (European Excel exports),
otherwise ``,``. Blank lines/rows are skipped; line numbers are physical (header = line 1 when the
file starts with it; for ``.xlsx`` the sheet row).

Limits (:class:`flows.brief_limits.BriefLimits`, the ``brief_max_*`` settings) are checked while the
file is read: the file's size before it is read, an .xlsx's unpacked size before it is unpacked, and
rows, cells and characters per cell as they arrive, so reading stops at the first one past a cap.
``variants`` is capped per row and, times the row's channels, per brief. Values that the database keeps
in bounded columns (``campaign``, ``row_id``, channel names) are checked against those columns' lengths.
A ``seed`` plus its row's ``variants`` must stay within ``2**63 - 1``: image *i* uses seed ``seed + i``,
and nothing wraps.

Validation collects every problem. Rows with problems are left out of :attr:`Brief.rows`. A
file-level problem (unreadable, unsupported type, too big, empty, header broken, required column
missing) always raises :class:`BriefError`; with ``strict=True`` any problem does. Cell text quoted in
a problem is shortened and its control characters are shown as escapes (:mod:`flows.safe_text`).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from flows.brand.cells import BRAND_COLUMNS, COPY_COLUMNS, BrandCells, check_brand, copy_without_brand
from flows.brief_inputs import CONTROL_COLUMNS, CONTROL_TYPES, PRODUCT_COLUMNS, ControlCell, check_control, check_product
from flows.brief_limits import COLUMN_LENGTHS, BriefLimits, RecordGuard, setting, too_big
from flows.brief_problems import BriefError, BriefProblem
from flows.content_filter import BLOCKLIST_COLUMNS, BriefFilter
from flows.fast_setting import FAST_COLUMNS, check_fast
from flows.safe_text import quoted
from flows.xlsx_reader import XlsxSheet

__all__ = [
    "Brief", "BriefError", "BriefLimits", "BriefProblem", "BriefRow", "CONTROL_TYPES", "ControlCell", "DEFAULT_LICENSE",
    "DEFAULT_VARIANTS", "LICENSES", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "SEED_LIMIT", "derive_seed", "normalize_name",
    "read_brief",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("campaign", "row_id", "subject", "channels")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "message", "audience", "style", "variants", "negative_prompt", "seed", "model", "license",
    *PRODUCT_COLUMNS, *CONTROL_COLUMNS, *BRAND_COLUMNS, *FAST_COLUMNS, *BLOCKLIST_COLUMNS,
)
LICENSES: tuple[str, ...] = ("commercial", "any")
DEFAULT_LICENSE = "commercial"
DEFAULT_VARIANTS = 4
SEED_LIMIT = 2**63  # seeds must be below this (torch.Generator.manual_seed takes int64)
SUPPORTED_SUFFIXES = (".csv", ".xlsx")

_SEP = re.compile(r"[\s_\-]+")
_WHOLE = re.compile(r"([+-]?)0*([0-9]+)")
_WHOLE_FLOAT = re.compile(r"([+-]?)0*([0-9]+)\.0*")
_HUGE = 10**20  # stands for any whole number of more than 20 digits, which no limit here reaches


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
    product_image: str = ""  # as written in the brief (relative to its folder); "" = none
    product_mask: str = ""
    placement: str = ""  # canonical ANCHOR:SCALE:MARGIN:SHADOW, or "" for the channel's default
    control: ControlCell | None = None
    brand: BrandCells = BrandCells()  # a brand kit (templates/brands/) and the copy its overlay draws
    fast: str | None = None  # canonical fast mode ("" = off); None = the channel's or the run's
    blocked_terms: tuple[str, ...] = ()  # the campaign's own blocked terms (its rows' blocked_terms cells)


@dataclass
class Brief:
    path: Path
    sha256: str
    rows: list[BriefRow]
    problems: list[BriefProblem]
    encoding: str | None = None  # "utf-8" / "utf-8-sig" / "utf-16-le" / "utf-16-be" / "cp1252" for CSV, None for XLSX
    columns: tuple[str, ...] = field(default=())  # normalised header names, in file order
    # What was read but may not be what the author meant (an .xlsx formula saved without its result); rows stay.
    warnings: list[BriefProblem] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _read_bytes(path: Path, file: str, limits: BriefLimits) -> bytes:
    """The file's bytes, refused by its size before any is read (and cut at the cap if it grows meanwhile)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_bytes:
                raise BriefError([too_big(file, size, limits)])
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise BriefError([BriefProblem(file, None, None, f"cannot read file: {exc.strerror or exc}")]) from None
    if len(data) > limits.max_bytes:
        raise BriefError([too_big(file, len(data), limits)])
    return data


_UTF16 = ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def _decode(data: bytes, file: str) -> tuple[str, str]:
    def refuse(message: str) -> BriefError:
        return BriefError([BriefProblem(file, None, None, f"cannot read file: {message}")])

    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        raise refuse("it is UTF-32 text, which is not supported (save it as UTF-8 or UTF-16 CSV)")
    for bom, encoding in _UTF16:
        if data.startswith(bom):
            try:
                text = data[len(bom):].decode(encoding)
            except UnicodeDecodeError as exc:
                raise refuse(f"not valid {encoding.upper()} text (byte {exc.start + len(bom)})") from None
            if "\x00" in text:
                raise refuse("it is binary, not CSV text")
            return text, encoding
    if b"\x00" in data:
        raise refuse("it is binary, not CSV text")
    try:
        text = data.decode("utf-8-sig")
        return text, ("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError as exc:
        raise refuse(f"neither UTF-8 nor cp1252 text (byte {exc.start})") from None


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _lines(text: str) -> Iterator[str]:
    """``text``'s lines with their endings, one at a time (what StringIO(newline="") gives, without its copy of
    the whole text at four bytes a character)."""
    return (m.group() for m in _LINE.finditer(text))


def _first_line(text: str) -> str:
    return next((line for line in _lines(text) if line.strip()), "")


# Briefs are read with the csv module and our own .xlsx reader, not pandas: every message names a physical line, and
# pandas.read_csv numbers records (a quoted cell spanning lines would shift every later line), rejects a row with more
# cells than the header (reported here per row) and a quote left open at the end of the file (kept here as text);
# pandas.read_excel turns formula errors (#N/A, #DIV/0!) into NaN, so a bad cell would pass as an empty one, and drops
# a sheet's empty trailing columns (still in Brief.columns).
def _read_csv(data: bytes, file: str, guard: RecordGuard) -> tuple[list[tuple[int, list[str]]], str]:
    text, encoding = _decode(data, file)
    first = _first_line(text)
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(_lines(text), delimiter=delimiter)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for cells in reader:
            cells = [c.strip() for c in cells]
            if any(cells):
                guard.take(start, cells)
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            if guard.limits.max_cell_chars < csv.field_size_limit():
                raise guard.cell_too_long(start, None) from None
            # The csv module's own cap (131072 characters, process-wide, so not raised here) is met before ours.
            raise guard.refuse(start, None, f"cell is longer than the {csv.field_size_limit()} characters a CSV cell "
                                            "may have (save the brief as .xlsx for longer cells)") from None
        raise BriefError([BriefProblem(file, start, None, f"cannot parse CSV: {exc}")]) from None
    return records, encoding


def _read_xlsx(data: bytes, file: str, guard: RecordGuard) -> tuple[list[tuple[int, list[str]]], list[BriefProblem]]:
    sheet = XlsxSheet(data, file, guard)
    records = list(sheet.rows())
    if records:  # the header as wide as the sheet, so that a value under no header is found
        line, header = records[0]
        records[0] = (line, header + [""] * (sheet.width - len(header)))
    return records, sheet.warnings


# --------------------------------------------------------------------------- validation


def _whole(text: str, *, lenient_float: bool) -> int | None:
    """The whole number ``text`` spells, or None; past 20 digits ``±_HUGE`` (int() refuses 4300+ digits, and no
    limit here needs the exact value)."""
    match = _WHOLE.fullmatch(text) or (_WHOLE_FLOAT.fullmatch(text) if lenient_float else None)
    if match is None:
        return None
    sign, digits = match.groups()
    n = _HUGE if len(digits) > 20 else int(digits)
    return -n if sign == "-" else n


def _split_channels(text: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for part in re.split(r"[,;]", text):
        name = normalize_name(part)
        if name:
            seen.setdefault(name, None)
    return tuple(seen)


def _too_long(column: str, value: str, what: str = "") -> str | None:
    """Why ``value`` does not fit the database column ``column``'s values go to, or None."""
    table_column, most = COLUMN_LENGTHS[column]
    if len(value) <= most:
        return None
    return f"{what}{quoted(value, 40)} is longer than the {most} characters the database keeps ({table_column})"


def _read_records(path: Path, file: str, suffix: str, limits: BriefLimits) -> tuple[bytes, list, str | None, list]:
    data = _read_bytes(path, file, limits)
    guard = RecordGuard(file, limits, normalize_name)
    if suffix == ".csv":
        records, encoding = _read_csv(data, file, guard)
        return data, records, encoding, []
    records, warnings = _read_xlsx(data, file, guard)
    return data, records, None, warnings


def read_brief(
    path: str | os.PathLike[str],
    *,
    known_channels: Collection[str] | None = None,
    strict: bool = False,
    limits: BriefLimits | None = None,
    blocklist: str | None = None,
) -> Brief:
    """Read and validate a brief; see the module docstring for columns and rules. ``limits``: the caps
    (default :class:`BriefLimits`'s; a run passes the settings' own); ``blocklist``: the setting (None = the
    shipped list, "" = off)."""
    path = Path(path)
    file = os.fspath(path)
    limits = limits or BriefLimits()
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise BriefError(
            [BriefProblem(file, None, None, f"unsupported file type {quoted(path.suffix)} (expected .csv or .xlsx)")]
        )
    data, records, encoding, warnings = _read_records(path, file, suffix, limits)
    sha256 = hashlib.sha256(data).hexdigest()
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

    text_filter = BriefFilter(blocklist, body, first_at, file)
    known = None if known_channels is None else {normalize_name(c) for c in known_channels}
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
        row = _check_row(values, line, bad, known, limits, lenient=suffix == ".xlsx")
        if (terms := text_filter.check(values, bad)) and row is not None:
            row = replace(row, blocked_terms=terms)

        row_id = values["row_id"]
        if row_id:
            key = row_id.casefold()
            if key in id_lines:
                duplicated.add(key)
                bad("row_id", f"duplicate row_id {quoted(row_id)} (also on line {id_lines[key]})")
            else:
                id_lines[key] = line

        problems.extend(row_problems)
        if not row_problems and row is not None:
            candidates.append(row)
            if warning := copy_without_brand(row.brand.brand, values):
                warnings.append(BriefProblem(file, line, *warning))

    _check_total(candidates, file, limits)
    if strict and problems:
        raise BriefError(problems)
    # A duplicated row_id makes every row carrying it ambiguous: none of them is used.
    rows = [r for r in candidates if r.row_id.casefold() not in duplicated]
    return Brief(path=path, sha256=sha256, rows=rows, problems=problems, encoding=encoding, columns=tuple(columns),
                 warnings=warnings)


def _check_row(values: dict[str, str], line: int, bad, known: set[str] | None, limits: BriefLimits, *,
               lenient: bool) -> BriefRow | None:
    """The row ``values`` make, after every check of its own; each problem goes to ``bad(column, message)``."""
    for name in REQUIRED_COLUMNS:
        if not values[name]:
            bad(name, "required value is empty")
    for name in ("campaign", "row_id"):
        if problem := _too_long(name, values[name]):
            bad(name, problem)

    channels = _split_channels(values["channels"])
    if values["channels"] and not channels:
        bad("channels", "no channel names given")
    for ch in channels:
        if problem := _too_long("channels", ch, "channel name "):
            bad("channels", problem)
        elif known is not None and ch not in known:
            bad("channels", f"unknown channel {quoted(ch)} (known: {', '.join(sorted(known))})")

    variants = DEFAULT_VARIANTS
    text = values.get("variants", "")
    if text:
        n = _whole(text, lenient_float=lenient)
        if n is None:
            bad("variants", f"{quoted(text)} is not a whole number")
        elif n < 1:
            bad("variants", f"{quoted(text)} must be at least 1")
        elif n > limits.max_variants_per_row:
            bad("variants", f"{quoted(text)} is more than {limits.max_variants_per_row} images per channel "
                            f"(setting {setting('max_variants_per_row')})")
        else:
            variants = n

    seed: int | None = None
    text = values.get("seed", "")
    if text:
        n = _whole(text, lenient_float=lenient)
        if n is None:
            bad("seed", f"{quoted(text)} is not a whole number")
        elif n < 0:
            bad("seed", f"{quoted(text)} must not be negative")
        elif n >= SEED_LIMIT:
            bad("seed", f"{quoted(text)} is too large (must be below 2**63)")
        elif n + variants - 1 >= SEED_LIMIT:
            # Image i uses seed + i; wrapping past 2**63 - 1 would silently reuse seeds 0, 1, 2...
            bad("seed", f"{quoted(text)} is too large for {variants} variants: image i uses seed + i, and the last "
                        f"must stay within 2**63 - 1 (use a seed of at most {SEED_LIMIT - variants})")
        else:
            seed = n

    licence = values.get("license", "").lower() or DEFAULT_LICENSE
    if licence not in LICENSES:
        bad("license", f"unknown licence {quoted(values['license'])} (expected 'commercial' or 'any')")

    product_image, product_mask, placement = check_product(values, bad)
    control = check_control(values, bad)

    if not (values["campaign"] and values["row_id"]):
        return None
    return BriefRow(
        campaign=values["campaign"],
        row_id=values["row_id"],
        subject=values["subject"],
        channels=channels,
        message=values.get("message", ""),
        audience=values.get("audience", ""),
        style=values.get("style", ""),
        variants=variants,
        negative_prompt=values.get("negative_prompt", ""),
        seed=derive_seed(values["campaign"], values["row_id"]) if seed is None else seed,
        model=values.get("model", "") or None,
        license=licence,
        # The copy columns stay template variables too (a prompt may say what the headline says).
        extra={k: v for k, v in values.items()
               if k not in REQUIRED_COLUMNS and (k not in OPTIONAL_COLUMNS or k in COPY_COLUMNS)},
        line=line,
        product_image=product_image,
        product_mask=product_mask,
        placement=placement,
        control=control,
        brand=check_brand(values, bad),
        fast=check_fast(values, bad),
    )


def _check_total(rows: list[BriefRow], file: str, limits: BriefLimits) -> None:
    """Refuse a brief whose rows together ask for more images than a brief may (before any is planned)."""
    total = 0
    for row in rows:
        total += row.variants * len(row.channels)
        if total > limits.max_variants_per_brief:
            raise BriefError([BriefProblem(
                file, row.line, "variants",
                f"the brief asks for more than {limits.max_variants_per_brief} images by this row (each row's "
                f"variants x its channels; setting {setting('max_variants_per_brief')})")])

"""Limits on what a brief may hold, checked while it is read, and the lengths of the database columns its values go to.

A brief comes from outside (a web upload, a file dropped in the inbox): a ``variants`` cell of 1000000000, an .xlsx
of 310 KB that unpacks to a 300 MB cell, or 2M rows would otherwise be read, planned and allocated in full. Each cap
is a setting (``brief_max_*`` in :mod:`flows.settings`) and is checked as the file is read, so reading stops at the
first row, cell or byte past it, with an error that names the file, the line and the column and the setting to
raise. The column lengths come from :mod:`storage.schema`, so that a value PostgreSQL would refuse (a ``row_id``
over 255 characters) is refused at validation on every backend, not half-way through a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from flows.brief_problems import BriefError, BriefProblem
from storage.schema import BriefRowRecord, Campaign, ModelRecord, PromptRecord, Variant

__all__ = ["COLUMN_LENGTHS", "MODEL_NAME_LENGTH", "TEMPLATE_LENGTH", "BriefLimits", "RecordGuard", "too_big"]


def _length(column: Any) -> int:
    return column.property.columns[0].type.length


# brief column -> (the database column its value is stored in, the most characters that column holds)
COLUMN_LENGTHS: dict[str, tuple[str, int]] = {
    "campaign": ("campaigns.name", _length(Campaign.name)),
    "row_id": ("brief_rows.row_key", _length(BriefRowRecord.row_key)),
    # each channel name; it is stored twice
    "channels": ("variants.channel", min(_length(PromptRecord.channel), _length(Variant.channel))),
}
TEMPLATE_LENGTH = _length(PromptRecord.template)  # a channel's template name (channels.yaml), per prompt
MODEL_NAME_LENGTH = _length(ModelRecord.name)  # a model's name (its file's modelspec.title or file name)


@dataclass(frozen=True)
class BriefLimits:
    """The caps, each the setting ``brief_<field>``. The defaults fit a brief of 10,000 rows of long prompts."""

    max_bytes: int = 16 * 2**20  # the file as stored (.csv or .xlsx)
    max_xlsx_bytes: int = 64 * 2**20  # an .xlsx unpacked: every part of the zip together, as its directory declares
    max_rows: int = 10_000  # rows under the header, blank rows not counted
    max_cells: int = 500_000  # cells of all rows together, each row as wide as its last non-empty cell
    max_cell_chars: int = 10_000  # characters in one cell
    max_variants_per_row: int = 1_000  # a row's ``variants`` (images per channel)
    max_variants_per_brief: int = 100_000  # images the whole brief asks for: each row's variants x its channels

    @classmethod
    def from_settings(cls, settings: Any) -> BriefLimits:
        return cls(**{f.name: getattr(settings, setting(f.name)) for f in fields(cls)})


def setting(name: str) -> str:
    """The setting that holds the limit ``name`` (a :class:`BriefLimits` field)."""
    return f"brief_{name}"


def too_big(file: str, size: int, limits: BriefLimits) -> BriefProblem:
    return BriefProblem(file, None, None, f"cannot read file: it is {size} bytes, more than the {limits.max_bytes} "
                                          f"allowed (setting {setting('max_bytes')})")


class RecordGuard:
    """Counts what a reader has kept and refuses the first record past a cap, naming its line and column.

    The first non-blank record is the header (its names, through ``normalize``, name the columns of later
    problems); the records after it are the rows."""

    def __init__(self, file: str, limits: BriefLimits, normalize: Callable[[str], str]):
        self.file = file
        self.limits = limits
        self.normalize = normalize
        self.header: list[str] | None = None
        self.rows = 0
        self.cells = 0

    def column(self, index: int) -> str | None:
        if self.header is not None and index < len(self.header) and self.header[index]:
            return self.header[index]
        return None

    def refuse(self, line: int | None, index: int | None, message: str) -> BriefError:
        name = None if index is None else self.column(index)
        if index is not None and name is None:
            message = f"column {index + 1}: {message}"
        return BriefError([BriefProblem(self.file, line, name, message)])

    def cell_too_long(self, line: int, index: int | None, where: str = "") -> BriefError:
        cap = self.limits.max_cell_chars
        return self.refuse(line, index, f"{where}cell is longer than {cap} characters "
                                        f"(setting {setting('max_cell_chars')})")

    def check_width(self, line: int, width: int) -> None:
        """Refuse a record of ``width`` cells before it is built, if it would pass the cells cap."""
        if self.cells + width > self.limits.max_cells:
            cap = self.limits.max_cells
            raise self.refuse(line, None, f"the brief has more than {cap} cells (setting {setting('max_cells')}); "
                                          f"reading stopped here")

    def take(self, line: int, cells: list[str]) -> None:
        """Count a non-blank record (the header first), or refuse it."""
        for i, cell in enumerate(cells):
            if len(cell) > self.limits.max_cell_chars:
                raise self.cell_too_long(line, i)
        self.check_width(line, len(cells))
        self.cells += len(cells)
        if self.header is None:
            self.header = [self.normalize(c) for c in cells]
            return
        self.rows += 1
        if self.rows > self.limits.max_rows:
            cap = self.limits.max_rows
            raise self.refuse(line, None, f"the brief has more than {cap} rows (setting {setting('max_rows')}); "
                                          f"reading stopped here")

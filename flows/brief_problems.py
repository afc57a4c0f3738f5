"""What is wrong with a brief: one :class:`BriefProblem` per finding (file, line, column, message), and
:class:`BriefError` for a brief that cannot be used. Kept apart from :mod:`flows.brief` so that the readers
(:mod:`flows.xlsx_reader`, :mod:`flows.brief_limits`) can raise them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flows.safe_text import visible

__all__ = ["BriefError", "BriefProblem"]


@dataclass(frozen=True)
class BriefProblem:
    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        col = "" if self.column is None else f" column '{self.column}':"
        # Messages quote cells (and file names): whoever prints a problem gets one line with no live escapes.
        return visible(f"{where}:{col} {self.message}")


class BriefError(ValueError):
    """A brief that cannot be used; ``problems`` holds every problem found, ``str()`` lists one per line."""

    def __init__(self, problems: Sequence[BriefProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

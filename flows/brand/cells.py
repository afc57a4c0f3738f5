"""A brief's brand columns: ``brand`` (a kit in ``templates/brands/``) and the copy its overlay carries, ``headline``,
``body`` and ``cta``. An empty copy cell takes the kit's ``copy`` template (say ``{{ tagline }}``); the cells are
checked here, where the row is read, the kit and the fitting when the row is planned (:mod:`flows.brand.rows`).
Without a brand the copy columns draw nothing (the brief warns) and stay plain template variables, as any column."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flows.brand.text import check_copy

__all__ = ["BRAND_COLUMNS", "COPY_COLUMNS", "BrandCells", "check_brand", "copy_without_brand"]

COPY_COLUMNS = ("headline", "body", "cta")
BRAND_COLUMNS = ("brand", *COPY_COLUMNS)
_BRAND = re.compile(r"[a-z0-9][a-z0-9_\-]{0,63}")


@dataclass(frozen=True)
class BrandCells:
    """A row's brand kit ("" for no overlay) and its copy as written ("" = the kit's copy template)."""

    brand: str = ""
    headline: str = ""
    body: str = ""
    cta: str = ""


def check_brand(values: dict[str, str], bad: Callable[[str, str], None]) -> BrandCells:
    """A row's brand cells; problems go to ``bad(column, message)``."""
    brand = values.get("brand", "").strip().lower()
    if brand and not _BRAND.fullmatch(brand):
        bad("brand", f"{brand[:40]!r} is not a brand kit name (lower-case letters, digits, '-' and '_')")
        brand = ""
    copy = []
    for column in COPY_COLUMNS:
        text = values.get(column, "").replace("\r\n", "\n").replace("\r", "\n").strip()
        if text and (problem := check_copy(text)):
            bad(column, problem)
            text = ""
        copy.append(text)
    return BrandCells(brand, *copy)


def copy_without_brand(brand: str, values: dict[str, str]) -> tuple[str, str] | None:
    """(column, warning) for a row with copy but no brand: nothing draws it."""
    written = [c for c in COPY_COLUMNS if values.get(c)]
    if brand or not written:
        return None
    return written[0], "copy without a brand draws no overlay (name the brand kit in the brand column)"

"""A/B results: importing delivery numbers per asset, and naming each test's winner.

A results file is a CSV with a header: ``asset_id`` or ``file_name`` (the name in an export's manifest, or the
asset's storage key), ``impressions``, ``clicks`` and optionally ``conversions``. Header names are
case-insensitive (``Asset ID``, ``asset-id``). The import is all or nothing: any problem (unknown asset, bad
number, more clicks than impressions, an asset listed twice) rejects the file with every problem listed.

An A/B test is one brief row and channel; its arms are the A/B groups reviewers assigned there, each the sum of
its assets' numbers. :func:`review.stats.verdict` names the winner, if any.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from review.stats import Arm, Verdict, verdict
from storage.database import Database, audit
from storage.review_schema import ABResult, ExportRecord, ReviewState
from storage.schema import Asset, BriefRowRecord, Variant, utcnow
from storage.variants import with_joins

__all__ = ["ABTest", "GroupStats", "ImportSummary", "METRICS", "ResultsError", "ab_tests", "import_results", "parse_results"]

Metric = Literal["ctr", "conversion"]
METRICS: dict[str, str] = {"ctr": "clicks / impressions", "conversion": "conversions / impressions"}
_ALIASES = {
    "asset_id": "asset_id", "asset": "asset_id", "id": "asset_id",
    "file_name": "file_name", "filename": "file_name", "file": "file_name",
    "impressions": "impressions", "clicks": "clicks", "conversions": "conversions",
}


class ResultsError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ParsedResult:
    line: int
    asset_id: int | None
    file_name: str | None
    impressions: int
    clicks: int
    conversions: int


def _norm(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _count(text: str) -> int:
    text = text.strip().replace("_", "")
    if not text.isdigit():
        raise ValueError
    return int(text)


def parse_results(data: bytes, source: str) -> list[ParsedResult]:
    """The file's rows; raises :class:`ResultsError` listing every problem."""
    rows, problems = _parse(data, source)
    if problems:
        raise ResultsError(problems)
    return rows


def _parse(data: bytes, source: str) -> tuple[list[ParsedResult], list[str]]:
    """Rows that read well, and the problems of the others (a bad header: no rows at all)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [f"{source}: not UTF-8 text"]
    # The csv module, not pandas.read_csv: problems name the file's lines, and read_csv rejects a row with more cells
    # than the header (extra cells are ignored here) and a quote left open at the end of the file.
    sample = text[:4096]
    delimiter = ";" if sample.count(";") > sample.count(",") else ","  # European spreadsheet exports use ';'
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        return [], [f"{source}: empty file"]
    columns = [_ALIASES.get(_norm(h)) for h in header]
    problems: list[str] = []
    if "asset_id" not in columns and "file_name" not in columns:
        problems.append(f"{source}:1: needs an 'asset_id' or a 'file_name' column")
    for needed in ("impressions", "clicks"):
        if needed not in columns:
            problems.append(f"{source}:1: missing column '{needed}'")
    if problems:
        return [], problems
    out: list[ParsedResult] = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        values = {col: (cells[i].strip() if i < len(cells) else "") for i, col in enumerate(columns) if col}
        counts: dict[str, int] = {}
        for name in ("impressions", "clicks", "conversions"):
            raw = values.get(name, "") or ("0" if name == "conversions" else "")
            try:
                counts[name] = _count(raw)
            except ValueError:
                problems.append(f"{source}:{line}: column '{name}': {raw!r} is not a whole number >= 0")
        asset_id: int | None = None
        if values.get("asset_id"):
            try:
                asset_id = _count(values["asset_id"])
            except ValueError:
                problems.append(f"{source}:{line}: column 'asset_id': {values['asset_id']!r} is not an asset id")
        file_name = values.get("file_name") or None
        if asset_id is None and file_name is None and not any(p.startswith(f"{source}:{line}:") for p in problems):
            problems.append(f"{source}:{line}: neither asset_id nor file_name given")
        if len(counts) == 3:
            if counts["clicks"] > counts["impressions"]:
                problems.append(f"{source}:{line}: {counts['clicks']} clicks but only {counts['impressions']} impressions")
            if counts["conversions"] > counts["impressions"]:
                problems.append(f"{source}:{line}: {counts['conversions']} conversions but only {counts['impressions']} impressions")
            if asset_id is not None or file_name is not None:
                out.append(ParsedResult(line, asset_id, file_name, counts["impressions"], counts["clicks"], counts["conversions"]))
    return out, problems


def _line_of(problem: str) -> int:
    parts = problem.split(":")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


@dataclass(frozen=True)
class ImportSummary:
    rows: int
    changed: int
    campaign_ids: list[int]


def _file_names(s: Session, campaign_id: int | None) -> dict[str, int]:
    stmt = select(ExportRecord).order_by(ExportRecord.id)
    if campaign_id is not None:
        stmt = stmt.where(ExportRecord.campaign_id == campaign_id)
    names: dict[str, int] = {}
    for record in s.scalars(stmt):
        for f in record.files:
            names[f["file_name"]] = int(f["asset_id"])  # later exports win: the newest name a file was sent under
    return names


def import_results(db: Database, data: bytes, source: str, *, actor: str, campaign_id: int | None = None) -> ImportSummary:
    parsed, problems = _parse(data, source)
    if problems and not parsed:
        raise ResultsError(problems)
    with db.session() as s:
        names = _file_names(s, campaign_id)
        resolved: dict[int, ParsedResult] = {}
        campaigns: set[int] = set()
        for r in parsed:
            asset_id = r.asset_id
            if asset_id is None and r.file_name is not None:
                asset_id = names.get(r.file_name)
                if asset_id is None:
                    asset_id = s.scalar(select(Asset.id).where(Asset.storage_key == r.file_name))
                if asset_id is None:
                    problems.append(f"{source}:{r.line}: no exported file or asset named {r.file_name!r}")
                    continue
            found = s.execute(
                select(Asset.id, BriefRowRecord.campaign_id)
                .join(Variant, Variant.id == Asset.variant_id)
                .join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                .where(Asset.id == asset_id)
            ).first()
            if found is None:
                problems.append(f"{source}:{r.line}: no asset {asset_id}")
                continue
            if campaign_id is not None and found[1] != campaign_id:
                problems.append(f"{source}:{r.line}: asset {asset_id} belongs to another campaign")
                continue
            if asset_id in resolved:
                problems.append(f"{source}:{r.line}: asset {asset_id} is listed twice (also on line {resolved[asset_id].line})")
                continue
            resolved[asset_id] = r
            campaigns.add(found[1])
        if problems:
            # Every problem of the file at once, in file order, so one round of fixes is enough.
            raise ResultsError(sorted(problems, key=_line_of))
        existing = {x.asset_id: x for x in s.scalars(select(ABResult).where(ABResult.asset_id.in_(list(resolved))))}
        changed = 0
        for asset_id, r in resolved.items():
            after = {"impressions": r.impressions, "clicks": r.clicks, "conversions": r.conversions, "source": source}
            row = existing.get(asset_id)
            before = None if row is None else {"impressions": row.impressions, "clicks": row.clicks,
                                               "conversions": row.conversions, "source": row.source}
            if before is not None and {k: before[k] for k in ("impressions", "clicks", "conversions")} == \
                    {k: after[k] for k in ("impressions", "clicks", "conversions")}:
                continue
            if row is None:
                row = ABResult(asset_id=asset_id)
                s.add(row)
            row.impressions, row.clicks, row.conversions, row.source = r.impressions, r.clicks, r.conversions, source
            row.imported_at, row.imported_by = utcnow(), actor
            audit(s, actor=actor, action="results.imported", entity="asset", entity_id=asset_id, before=before, after=after)
            changed += 1
        return ImportSummary(len(resolved), changed, sorted(campaigns))


# ------------------------------------------------------------------------------------------------ the view


@dataclass
class GroupStats:
    name: str
    asset_ids: list[int] = field(default_factory=list)
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0

    def successes(self, metric: str) -> int:
        return self.clicks if metric == "ctr" else self.conversions

    def rate(self, metric: str) -> float | None:
        return self.successes(metric) / self.impressions if self.impressions else None


@dataclass
class ABTest:
    row_id: int
    row_key: str
    channel: str
    groups: list[GroupStats]
    verdict: Verdict
    ungrouped_assets: int  # assets with results but no group: not part of the test


def ab_tests(s: Session, campaign_id: int, *, confidence: float, metric: str = "ctr") -> list[ABTest]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    rows = s.execute(
        with_joins(select(Variant.row_id, BriefRowRecord.row_key, Variant.channel, ReviewState.ab_group, Asset.id,
                          ABResult.impressions, ABResult.clicks, ABResult.conversions), asset=True, row=True, review=True)
        .join(ABResult, ABResult.asset_id == Asset.id)
        .where(BriefRowRecord.campaign_id == campaign_id)
        .order_by(BriefRowRecord.row_key, Variant.row_id, Variant.channel, ReviewState.ab_group, Asset.id)
    ).all()
    return _summarise(pd.DataFrame([tuple(r) for r in rows], columns=_VIEW_COLUMNS), confidence=confidence, metric=metric)


_VIEW_COLUMNS = ["row_id", "row_key", "channel", "group", "asset_id", "impressions", "clicks", "conversions"]


def _summarise(results: pd.DataFrame, *, confidence: float, metric: str) -> list[ABTest]:
    """One test per brief row and channel in the rows' order; per test, each A/B group's sums, groups by name."""
    results = results.assign(group=results["group"].fillna(""))
    out = []
    for (row_id, channel), test in results.groupby(["row_id", "channel"], sort=False, dropna=False):
        sums = test[test["group"] != ""].groupby("group").agg(
            asset_ids=("asset_id", list), impressions=("impressions", "sum"),
            clicks=("clicks", "sum"), conversions=("conversions", "sum"))
        groups = [GroupStats(g.Index, [int(a) for a in g.asset_ids], int(g.impressions), int(g.clicks), int(g.conversions))
                  for g in sums.itertuples()]
        arms = [Arm(g.name, g.successes(metric), g.impressions) for g in groups]
        out.append(ABTest(int(row_id), test["row_key"].iloc[0], channel, groups, verdict(arms, confidence),
                          int((test["group"] == "").sum())))
    return out

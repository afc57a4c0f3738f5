"""A/B results: importing delivery numbers per asset, and naming each test's winner.

A results file is a CSV with a header: ``asset_id`` or ``file_name`` (the name in an export's manifest, or the
asset's storage key), ``impressions``, ``clicks`` and optionally ``conversions``. Header names are
case-insensitive (``Asset ID``, ``asset-id``). The import is all or nothing: any problem (unknown asset, bad
number, more clicks than impressions, an asset listed twice) rejects the file, with its first problems listed
(:mod:`review.results_csv` reads it as a stream and bounds rows, lines, cells and the list of problems).

An A/B test is one brief row and channel; its arms are the A/B groups reviewers assigned there, each the sum of
its assets' numbers. :func:`review.stats.verdict` names the winner, if any.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import BinaryIO, Literal

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from review.results_csv import MAX_PROBLEMS, ParsedResult, Problems, read_results, shown
from review.stats import Arm, Verdict, verdict
from storage.database import Database, audit
from storage.review_schema import ABResult, ExportRecord, ReviewState
from storage.schema import Asset, BriefRowRecord, Variant, utcnow
from storage.variants import with_joins

__all__ = ["ABTest", "GroupStats", "ImportSummary", "METRICS", "ParsedResult", "ResultsError", "ab_tests",
           "import_results", "parse_results"]

Metric = Literal["ctr", "conversion"]
METRICS: dict[str, str] = {"ctr": "clicks / impressions", "conversion": "conversions / impressions"}
# Rows looked up per query: well under SQLite's bound-parameter limit, few round trips for a large file.
LOOKUP_CHUNK = 500


class ResultsError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_results(data: bytes | BinaryIO, source: str, *, max_rows: int | None = None,
                  max_problems: int = MAX_PROBLEMS) -> list[ParsedResult]:
    """The file's rows; raises :class:`ResultsError` listing its first problems."""
    problems = Problems(source, max_problems)
    rows = list(read_results(data, source, problems, max_rows=max_rows))
    if problems:
        raise ResultsError(problems.lines())
    return rows


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


def _chunks(items: Iterable[ParsedResult], size: int) -> Iterator[list[ParsedResult]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class _Resolver:
    """Rows to assets, a chunk at a time (three queries per chunk, not one per row)."""

    def __init__(self, s: Session, campaign_id: int | None, problems: Problems):
        self.s, self.campaign_id, self.problems = s, campaign_id, problems
        self.names = _file_names(s, campaign_id)
        self.resolved: dict[int, ParsedResult] = {}
        self.campaigns: set[int] = set()

    def add(self, chunk: list[ParsedResult]) -> None:
        unknown = {r.file_name for r in chunk if r.asset_id is None and r.file_name not in self.names}
        by_key = dict(self.s.execute(select(Asset.storage_key, Asset.id).where(Asset.storage_key.in_(unknown)))
                      .all()) if unknown else {}
        ids: list[int | None] = []
        for r in chunk:
            asset_id = r.asset_id
            if asset_id is None and r.file_name is not None:
                asset_id = self.names.get(r.file_name, by_key.get(r.file_name))
                if asset_id is None:
                    self.problems.add(r.line, f"no exported file or asset named {shown(r.file_name)}")
            ids.append(asset_id)
        # Ids the table cannot hold are not looked up (PostgreSQL's integer ids stop at 2^31 - 1 and refuse more).
        top = 2**31 - 1 if self.s.get_bind().dialect.name == "postgresql" else 2**63 - 1
        wanted = {i for i in ids if i is not None and i <= top}
        found = dict(self.s.execute(
            select(Asset.id, BriefRowRecord.campaign_id)
            .join(Variant, Variant.id == Asset.variant_id)
            .join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
            .where(Asset.id.in_(wanted))
        ).all()) if wanted else {}
        for r, asset_id in zip(chunk, ids):
            if asset_id is None:
                continue
            campaign = found.get(asset_id)
            if campaign is None:
                self.problems.add(r.line, f"no asset {asset_id}")
            elif self.campaign_id is not None and campaign != self.campaign_id:
                self.problems.add(r.line, f"asset {asset_id} belongs to another campaign")
            elif asset_id in self.resolved:
                self.problems.add(r.line, f"asset {asset_id} is listed twice (also on line {self.resolved[asset_id].line})",
                                  repeat=True)
            else:
                self.resolved[asset_id] = r
                self.campaigns.add(campaign)


def import_results(db: Database, data: bytes | BinaryIO, source: str, *, actor: str, campaign_id: int | None = None,
                   max_rows: int | None = None, max_problems: int = MAX_PROBLEMS) -> ImportSummary:
    """Import a results file (all or nothing). ``max_rows`` defaults to ``ADFORGE_RESULTS_MAX_ROWS`` or 100,000;
    a rejected file raises :class:`ResultsError` with its first ``max_problems`` problems, in file order."""
    problems = Problems(source, max_problems)
    with db.session() as s:
        resolver = _Resolver(s, campaign_id, problems)
        for chunk in _chunks(read_results(data, source, problems, max_rows=max_rows), LOOKUP_CHUNK):
            resolver.add(chunk)
        if problems:
            # The file's first problems at once, in file order, so one round of fixes goes a long way.
            raise ResultsError(problems.lines())
        resolved = resolver.resolved
        ids = list(resolved)
        existing: dict[int, ABResult] = {}
        for i in range(0, len(ids), LOOKUP_CHUNK):
            existing.update((x.asset_id, x) for x in s.scalars(select(ABResult).where(ABResult.asset_id.in_(ids[i : i + LOOKUP_CHUNK]))))
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
        return ImportSummary(len(resolved), changed, sorted(resolver.campaigns))


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


_COUNTS = ("impressions", "clicks", "conversions")
_VIEW_COLUMNS = ["row_id", "row_key", "channel", "group", "asset_id", "impressions", "clicks", "conversions"]


def _summarise(results: pd.DataFrame, *, confidence: float, metric: str) -> list[ABTest]:
    """One test per brief row and channel in the rows' order; per test, each A/B group's sums, groups by name."""
    # Python ints, not int64: a sum of counts near 2^63 (imported before counts were capped) must not wrap silently.
    results = results.assign(group=results["group"].fillna(""), **{c: results[c].astype(object) for c in _COUNTS})
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

"""Audit export: per asset, everything needed to make it again and every decision made about it.

JSON (exact values, nested)::

    {"campaign": {...}, "generated_at": ..., "campaign_decisions": [...],
     "assets": [{"asset_id": 7, "reproduce": {prompt, negative_prompt, seed, sampler, steps, cfg_scale, clip_skip,
                 fast, gen/out size, format, postprocess, model {name, path, sha256, hash, licence}}, "brief": ..., "row": ...,
                 "file": {store url, key, sha256, infotext}, "runs": {...}, "review": {...}, "results": ..., "exports": [...],
                 "decisions": [{"id", "at", "actor", "action", "before", "after", "run_id"}, ...]}, ...]}

CSV: one line per asset with the same facts flattened; nested values (row data, run settings, decisions) as
JSON text in their cells; formula-like text guarded (:mod:`review.csvutil`).

"Decisions" are the audit log entries about the variant or its asset (planning, storing, every review action,
re-render requests, results imports) and the campaign exports that included it, oldest first.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from review.csvutil import safe_cell
from review.export import find_campaign
from storage.database import Database
from storage.review_schema import ABResult, ExportRecord, ReviewState
from storage.schema import Asset, AuditEntry, Brief, BriefRowRecord, ModelRecord, PromptRecord, Run, Variant, utcnow
from storage.variants import describe_adapters, with_joins

__all__ = ["AuditExport", "AuditExportError", "CSV_COLUMNS", "audit_export", "to_csv", "to_json"]

CSV_COLUMNS = [
    "asset_id", "variant_id", "identity", "campaign", "brief_file", "brief_sha256", "row", "row_line", "channel",
    "template", "variation_index", "prompt", "negative_prompt", "seed", "sampler", "steps", "cfg_scale", "clip_skip",
    "fast", "gen_width", "gen_height", "out_width", "out_height", "out_format", "out_max_kb", "postprocess", "adapters",
    "model_name", "model_path", "model_sha256", "model_hash", "model_family", "model_licence", "model_commercial_use",
    "store_url", "storage_key", "sha256", "size_bytes", "infotext", "run_id", "flow_run_id", "run_settings",
    "review_status", "starred", "ab_group", "reviewed_by", "reviewed_at", "impressions", "clicks", "conversions",
    "exported_as", "decision_count", "decisions", "row_data", "flagged", "flags", "released_by", "released_at",
]
_CHUNK = 500  # SQLite's bound-parameter limit is far above this; PostgreSQL's too


class AuditExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class AuditExport:
    campaign: dict[str, Any]
    generated_at: str
    campaign_decisions: list[dict[str, Any]]
    assets: list[dict[str, Any]]


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _entry(e: AuditEntry) -> dict[str, Any]:
    return {"id": e.id, "at": _iso(e.at), "actor": e.actor, "action": e.action, "entity": e.entity,
            "entity_id": e.entity_id, "run_id": e.run_id, "before": e.before, "after": e.after}


def _run(run: Run | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"id": run.id, "flow_run_id": run.flow_run_id, "status": run.status, "brief_path": run.brief_path,
            "host": run.host, "settings": run.settings, "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at)}


def _entries(s: Session, entity: str, ids: list[int]) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    keys = [str(i) for i in ids]
    for i in range(0, len(keys), _CHUNK):
        out.extend(s.scalars(select(AuditEntry).where(AuditEntry.entity == entity,
                                                      AuditEntry.entity_id.in_(keys[i:i + _CHUNK]))))
    return out


def audit_export(db: Database, campaign_ref: str | int) -> AuditExport:
    adapters: dict[str, list[dict[str, Any]]] = {"": []}  # a variant's adapters text -> described (shared by many)
    with db.session() as s:
        campaign = find_campaign(s, campaign_ref)
        if campaign is None:
            raise AuditExportError(f"no campaign {campaign_ref!r}")
        found = s.execute(
            with_joins(select(Asset, Variant, PromptRecord, ModelRecord, BriefRowRecord, Brief),
                       asset=True, prompt=True, model=True, brief=True)
            .where(BriefRowRecord.campaign_id == campaign.id)
            .order_by(BriefRowRecord.row_key, Variant.channel, Variant.variant_index, Asset.id)
        ).all()
        variant_ids = [v.id for _, v, *_ in found]
        asset_ids = [a.id for a, *_ in found]
        states = {st.variant_id: st for i in range(0, len(variant_ids), _CHUNK)
                  for st in s.scalars(select(ReviewState).where(ReviewState.variant_id.in_(variant_ids[i:i + _CHUNK])))}
        results = {r.asset_id: r for i in range(0, len(asset_ids), _CHUNK)
                   for r in s.scalars(select(ABResult).where(ABResult.asset_id.in_(asset_ids[i:i + _CHUNK])))}
        run_ids = {a.run_id for a, *_ in found if a.run_id} | {v.first_run_id for _, v, *_ in found if v.first_run_id}
        runs = {r.id: r for r in s.scalars(select(Run).where(Run.id.in_(run_ids)))} if run_ids else {}

        by_variant: dict[int, list[AuditEntry]] = {}
        for e in _entries(s, "variant", variant_ids):
            by_variant.setdefault(int(e.entity_id), []).append(e)
        by_asset: dict[int, list[AuditEntry]] = {}
        for e in _entries(s, "asset", asset_ids):
            by_asset.setdefault(int(e.entity_id), []).append(e)
        # Planning is recorded per run ("variants.planned" lists the new variant ids).
        planned: dict[int, AuditEntry] = {}
        if run_ids:
            for e in s.scalars(select(AuditEntry).where(AuditEntry.entity == "run", AuditEntry.action == "variants.planned",
                                                        AuditEntry.entity_id.in_([str(r) for r in run_ids]))):
                for vid in (e.after or {}).get("variant_ids", []):
                    planned.setdefault(int(vid), e)
        campaign_entries = list(s.scalars(
            select(AuditEntry).where(AuditEntry.entity == "campaign", AuditEntry.entity_id == str(campaign.id))
            .order_by(AuditEntry.id)))
        exported_in: dict[int, list[AuditEntry]] = {}
        for e in campaign_entries:
            if e.action == "campaign.exported":
                for aid in (e.after or {}).get("asset_ids", []):
                    exported_in.setdefault(int(aid), []).append(e)
        exports: dict[int, list[dict[str, Any]]] = {}
        for record in s.scalars(select(ExportRecord).where(ExportRecord.campaign_id == campaign.id).order_by(ExportRecord.id)):
            for f in record.files:
                exports.setdefault(int(f["asset_id"]), []).append(
                    {"export_id": record.id, "file_name": f["file_name"], "by": record.created_by,
                     "at": _iso(record.created_at), "approved_only": record.approved_only})

        assets: list[dict[str, Any]] = []
        for asset, variant, prompt, model, row, brief in found:
            entries = by_variant.get(variant.id, []) + by_asset.get(asset.id, []) + exported_in.get(asset.id, [])
            if variant.id in planned:
                entries.append(planned[variant.id])
            decisions = [_entry(e) for e in sorted(entries, key=lambda e: e.id)]
            state, result = states.get(variant.id), results.get(asset.id)
            assets.append({
                "asset_id": asset.id,
                "variant_id": variant.id,
                "identity": variant.identity,
                "campaign": campaign.name,
                "brief": {"file_name": brief.file_name, "sha256": brief.sha256},
                "row": {"key": row.row_key, "line": row.line, "data": row.data},
                "channel": variant.channel,
                "reproduce": {
                    "template": prompt.template, "variation_index": prompt.variation_index, "prompt": prompt.prompt,
                    "negative_prompt": prompt.negative_prompt, "seed": variant.seed, "sampler": variant.sampler,
                    "steps": variant.steps, "cfg_scale": variant.cfg_scale, "clip_skip": variant.clip_skip,
                    "fast": variant.fast,
                    "gen_width": variant.gen_width, "gen_height": variant.gen_height, "out_width": variant.out_width,
                    "out_height": variant.out_height, "out_format": variant.out_format, "out_max_kb": variant.out_max_kb,
                    "postprocess": variant.postprocess,
                    "adapters": adapters.get(variant.adapters) or adapters.setdefault(
                        variant.adapters, describe_adapters(s, variant.adapters)),
                    "model": {"name": model.name, "path": model.path, "sha256": model.sha256, "hash": model.short_hash,
                              "family": model.family, "licence": model.license, "commercial_use": model.commercial_use},
                },
                "file": {"store_url": asset.store_url, "key": asset.storage_key, "sha256": asset.sha256,
                         "size_bytes": asset.size_bytes, "format": asset.format, "width": asset.width, "height": asset.height,
                         "infotext": asset.infotext, "created_at": _iso(asset.created_at)},
                "runs": {"stored_by": _run(runs.get(asset.run_id)), "first_planned_by": variant.first_run_id},
                "review": {"status": state.status if state else "pending", "starred": bool(state and state.starred),
                           "group": state.ab_group if state else None, "by": state.updated_by if state else None,
                           "at": _iso(state.updated_at) if state else None},
                "results": None if result is None else {"impressions": result.impressions, "clicks": result.clicks,
                                                        "conversions": result.conversions, "source": result.source},
                "exports": exports.get(asset.id, []),
                "decisions": decisions,
                # The image filter's verdict: a flagged asset is listed here (auditors see it) but never exported.
                "filter": {"flagged": asset.flagged, "flags": json.loads(asset.flags) if asset.flags else None,
                           "released_by": asset.released_by, "released_at": _iso(asset.released_at)},
            })
        return AuditExport(
            campaign={"id": campaign.id, "name": campaign.name, "created_at": _iso(campaign.created_at)},
            generated_at=utcnow().isoformat(),
            campaign_decisions=[_entry(e) for e in campaign_entries if e.action != "campaign.exported"],
            assets=assets,
        )


def to_json(export: AuditExport) -> str:
    return json.dumps({"campaign": export.campaign, "generated_at": export.generated_at,
                       "campaign_decisions": export.campaign_decisions, "assets": export.assets},
                      indent=2, ensure_ascii=False, sort_keys=False)


def _csv_row(a: dict[str, Any]) -> dict[str, Any]:
    r, m, f, run, rv, res = a["reproduce"], a["reproduce"]["model"], a["file"], a["runs"]["stored_by"], a["review"], a["results"]
    compact = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"), sort_keys=True)  # noqa: E731
    return {
        "asset_id": a["asset_id"], "variant_id": a["variant_id"], "identity": a["identity"], "campaign": a["campaign"],
        "brief_file": a["brief"]["file_name"], "brief_sha256": a["brief"]["sha256"], "row": a["row"]["key"],
        "row_line": a["row"]["line"], "channel": a["channel"], "template": r["template"], "variation_index": r["variation_index"],
        "prompt": r["prompt"], "negative_prompt": r["negative_prompt"], "seed": r["seed"], "sampler": r["sampler"],
        "steps": r["steps"], "cfg_scale": r["cfg_scale"], "clip_skip": r["clip_skip"], "fast": r["fast"],
        "gen_width": r["gen_width"],
        "gen_height": r["gen_height"], "out_width": r["out_width"], "out_height": r["out_height"], "out_format": r["out_format"],
        "out_max_kb": r["out_max_kb"], "postprocess": r["postprocess"], "adapters": compact(r["adapters"]) if r["adapters"] else "",
        "model_name": m["name"], "model_path": m["path"],
        "model_sha256": m["sha256"], "model_hash": m["hash"], "model_family": m["family"], "model_licence": m["licence"],
        "model_commercial_use": m["commercial_use"], "store_url": f["store_url"], "storage_key": f["key"],
        "sha256": f["sha256"], "size_bytes": f["size_bytes"], "infotext": f["infotext"],
        "run_id": run["id"] if run else None, "flow_run_id": run["flow_run_id"] if run else None,
        "run_settings": compact(run["settings"]) if run else None, "review_status": rv["status"], "starred": rv["starred"],
        "ab_group": rv["group"], "reviewed_by": rv["by"], "reviewed_at": rv["at"],
        "impressions": res["impressions"] if res else None, "clicks": res["clicks"] if res else None,
        "conversions": res["conversions"] if res else None, "exported_as": compact([e["file_name"] for e in a["exports"]]),
        "decision_count": len(a["decisions"]), "decisions": compact(a["decisions"]), "row_data": compact(a["row"]["data"]),
        "flagged": a["filter"]["flagged"], "flags": compact(a["filter"]["flags"]) if a["filter"]["flags"] else None,
        "released_by": a["filter"]["released_by"], "released_at": a["filter"]["released_at"],
    }


def to_csv(export: AuditExport) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for a in export.assets:
        writer.writerow({k: safe_cell(v) for k, v in _csv_row(a).items()})
    return out.getvalue()


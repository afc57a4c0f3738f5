"""Submissions as JSON: status, counts and progress read from the database, the assets page, asset metadata.

Counts of a running run come from what it recorded so far: ``runs.counts`` holds planned / skipped from the
moment it planned (flows.recording.note_plan), assets with its run id are rendered, ``variant.failed`` audit entries
with its run id are failures. Images per second: rendered over the time since the run started; ETA: what is left
at that rate. Flagged assets that no admin released are left out of every list (storage.releases.withheld).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import distinct, func, select

from review.tokens import iso
from storage.releases import withheld
from storage.review_schema import ReviewState, Submission
from storage.run_metrics import device_seconds
from storage.schema import Asset, AuditEntry, BriefRowRecord, Campaign, Run, Variant

__all__ = ["TERMINAL", "asset_json", "asset_url", "assets_page", "submission_json"]

TERMINAL = ("completed", "completed_with_failures", "failed", "cancelled")
NEWEST = 12
FAILED_ACTION = "variant.failed"


def asset_url(state: Any, asset: Asset) -> str:
    """Where the file can be fetched: a presigned S3 URL (S3 store, presign delivery), else through the API."""
    from review.files import presigned_url
    from storage.assets import S3AssetStore

    store = state.store
    if isinstance(store, S3AssetStore) and state.s3_delivery == "presign":
        return presigned_url(store, asset.storage_key, state.presign_seconds)
    return f"/api/v1/assets/{asset.id}/file"


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    return None if t is None else t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _counts(s: Any, sub: Submission, run: Run | None) -> dict[str, int]:
    planned = int((sub.plan or {}).get("images", 0))
    if run is None:
        return {"planned": planned, "done": 0, "rendered": 0, "skipped": 0, "failed": 0, "flagged": 0}
    recorded = run.counts or {}
    rendered, flagged = _asset_counts(s, run.id)
    failed = s.scalar(select(func.count(distinct(AuditEntry.entity_id)))
                      .where(AuditEntry.action == FAILED_ACTION, AuditEntry.run_id == run.id)) or 0
    if run.finished_at is not None and "failed" in recorded:
        failed = int(recorded["failed"])
    planned = int(recorded.get("planned", planned))
    skipped = int(recorded.get("skipped", 0))
    return {"planned": planned, "done": min(planned, rendered + skipped + failed) if planned else rendered + skipped + failed,
            "rendered": rendered, "skipped": skipped, "failed": int(failed), "flagged": flagged}


def _asset_counts(s: Any, run_id: int) -> tuple[int, int]:
    total = s.scalar(select(func.count(Asset.id)).where(Asset.run_id == run_id)) or 0
    flagged = s.scalar(select(func.count(Asset.id)).where(Asset.run_id == run_id, Asset.flagged.is_(True))) or 0
    return int(total), int(flagged)


def _progress(sub: Submission, run: Run | None, counts: dict[str, int]) -> dict[str, Any]:
    started = _aware(run.started_at if run is not None else sub.started_at)
    end = _aware(run.finished_at if run is not None and run.finished_at else sub.finished_at) or dt.datetime.now(dt.timezone.utc)
    elapsed = max(0.0, (end - started).total_seconds()) if started else 0.0
    rate = counts["rendered"] / elapsed if elapsed > 0 and counts["rendered"] else None
    left = max(0, counts["planned"] - counts["done"])
    fraction = 1.0 if sub.status in TERMINAL else (counts["done"] / counts["planned"] if counts["planned"] else 0.0)
    return {"fraction": round(fraction, 4), "images_per_second": round(rate, 4) if rate else None,
            "eta_seconds": (0.0 if sub.status in TERMINAL else round(left / rate, 1) if rate else None),
            "elapsed_seconds": round(elapsed, 1)}


def _cost(run: Run | None, price: float) -> dict[str, Any] | None:
    if run is None:
        return None
    secs = device_seconds(run.timings)
    recorded = (run.settings or {}).get("price_per_device_hour")
    used = float(recorded) if isinstance(recorded, (int, float)) and recorded > 0 else (price or None)
    return {"device_seconds": round(secs, 3) if secs is not None else None, "price_per_device_hour": used,
            "cost": round(secs / 3600 * used, 6) if secs is not None and used else None}


def _newest(state: Any, s: Any, run_id: int) -> list[dict[str, Any]]:
    rows = s.execute(select(Asset, Variant.channel).join(Variant, Variant.id == Asset.variant_id)
                     .where(Asset.run_id == run_id).order_by(Asset.id.desc()).limit(NEWEST * 2)).all()
    out = []
    for asset, channel in rows:
        if withheld(asset):
            continue
        out.append({"asset_id": asset.id, "variant_id": asset.variant_id, "channel": channel,
                    "thumb": f"/api/v1/assets/{asset.id}/thumb?w=320", "url": asset_url(state, asset)})
        if len(out) == NEWEST:
            break
    return out


def run_of(s: Any, sub: Submission) -> Run | None:
    if sub.run_id is not None:
        run = s.get(Run, sub.run_id)
        if run is not None:
            return run
    return s.scalar(select(Run).where(Run.submission_id == sub.id).order_by(Run.id.desc()).limit(1))


def submission_json(state: Any, s: Any, sub: Submission, *, full: bool = True) -> dict[str, Any]:
    run = run_of(s, sub)
    counts = _counts(s, sub, run)
    sid = sub.id
    out: dict[str, Any] = {
        "id": sid, "status": sub.status, "terminal": sub.status in TERMINAL, "backend": sub.backend,
        "flow_run_id": sub.flow_run_id, "run_id": run.id if run is not None else None,
        "submitted_by": sub.submitted_by, "via": "token" if sub.token_id else "web",
        "created_at": iso(sub.created_at), "started_at": iso(sub.started_at), "finished_at": iso(sub.finished_at),
        "brief": {"name": sub.brief_name, "sha256": sub.brief_sha256, "url": f"/api/v1/runs/{sid}/brief"},
        "options": sub.options or {},
        "plan": {k: (sub.plan or {}).get(k) for k in ("images", "rows", "row_channels")},
        "counts": counts, "cost": _cost(run, state.runs.price_per_device_hour), "error": sub.error,
        "cancel": ({"requested_by": sub.cancel_requested_by, "requested_at": iso(sub.cancel_requested_at)}
                   if sub.cancel_requested_by else None),
        "webhook": ({"url": sub.webhook_url, **{"state": "pending", "attempts": 0, "last_status": None, "error": None},
                     **(sub.webhook_state or {})} if sub.webhook_url else None),
        "links": {"self": f"/api/v1/runs/{sid}", "assets": f"/api/v1/runs/{sid}/assets",
                  "cancel": f"/api/v1/runs/{sid}/cancel", "page": f"/runs/{sid}"},
    }
    started = _aware(sub.started_at or sub.created_at)
    finished = _aware(sub.finished_at)
    out["duration_seconds"] = round((finished - started).total_seconds(), 1) if finished and started else None
    if full:
        out["progress"] = _progress(sub, run, counts)
        out["newest"] = _newest(state, s, run.id) if run is not None else []
    return out


def asset_json(state: Any, s: Any, asset: Asset) -> dict[str, Any]:
    row = s.execute(select(Variant, BriefRowRecord.row_key, Campaign.name, ReviewState.status)
                    .join(BriefRowRecord, BriefRowRecord.id == Variant.row_id)
                    .join(Campaign, Campaign.id == BriefRowRecord.campaign_id)
                    .outerjoin(ReviewState, ReviewState.variant_id == Variant.id)
                    .where(Variant.id == asset.variant_id)).first()
    variant, row_key, campaign, review = row if row is not None else (None, None, None, None)
    return {"id": asset.id, "variant_id": asset.variant_id, "run_id": asset.run_id, "campaign": campaign,
            "row_id": row_key, "channel": variant.channel if variant else None,
            "variant_index": variant.variant_index if variant else None, "seed": variant.seed if variant else None,
            "width": asset.width, "height": asset.height, "format": asset.format, "size_bytes": asset.size_bytes,
            "sha256": asset.sha256, "status": review or "pending", "created_at": iso(asset.created_at),
            "url": asset_url(state, asset), "thumb": f"/api/v1/assets/{asset.id}/thumb?w=320"}


def assets_page(state: Any, s: Any, sub: Submission, page: int, per_page: int) -> dict[str, Any]:
    run = run_of(s, sub)
    out: dict[str, Any] = {"run": sub.id, "page": page, "per_page": per_page, "total": 0, "withheld": 0, "assets": []}
    if run is None:
        return out
    visible = (Asset.run_id == run.id) & ((Asset.flagged.is_not(True)) | Asset.released_at.is_not(None))
    out["total"] = s.scalar(select(func.count(Asset.id)).where(visible)) or 0
    out["withheld"] = s.scalar(select(func.count(Asset.id)).where(Asset.run_id == run.id, Asset.flagged.is_(True),
                                                                  Asset.released_at.is_(None))) or 0
    assets = s.scalars(select(Asset).where(visible).order_by(Asset.id).offset((page - 1) * per_page).limit(per_page))
    out["assets"] = [asset_json(state, s, a) for a in assets]
    return out


"""JSON API (keyboard review, detail panel) and the image routes (thumbnails, full-size files)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from review.actions import ReviewChange, apply_review, queue_rerender
from review.files import asset_response, safe_key
from review.ids import Id
from review.middleware import LimitedRoute
from review.queries import campaign_of_variant, readiness, review_config, variant_detail
from review.security import CurrentUser, current_user, require_role
from review.thumbs import THUMB_WIDTHS
from storage.releases import ReleaseError, release_asset, withheld, withheld_message
from storage.schema import Asset

__all__ = ["router"]

router = APIRouter(route_class=LimitedRoute)
Viewer = Annotated[CurrentUser, Depends(current_user)]
Reviewer = Annotated[CurrentUser, Depends(require_role("reviewer"))]
Admin = Annotated[CurrentUser, Depends(require_role("admin"))]


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["pending", "approved", "rejected"] | None = None
    starred: bool | None = None
    group: str | None = None  # "A".."I"; null clears the group


class RerenderBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None


def review_result(request: Request, variant_id: int, state: dict[str, Any], changed: bool) -> dict[str, Any]:
    """The new state plus the readiness of the variant's row and channel, which the grid's badge shows."""
    db, defaults = request.app.state.db, request.app.state.defaults
    with db.session() as s:
        campaign_id, row_id, channel = campaign_of_variant(s, variant_id)  # type: ignore[misc]  (exists: just changed)
        needed = review_config(s, campaign_id, defaults).approvals_needed
        r = readiness(s, campaign_id, needed, row_id=row_id, channel=channel).get((row_id, channel))
    return {
        "variant_id": variant_id, "changed": changed, "review": state,
        "readiness": {"row_id": row_id, "channel": channel, "approved": r.approved if r else 0, "needed": needed,
                      "total": r.total if r else 0, "ready": bool(r and r.ready)},
    }


@router.get("/api/variants/{variant_id}")
def api_variant(request: Request, variant_id: Id, user: Viewer) -> dict[str, Any]:
    with request.app.state.db.session() as s:
        detail = variant_detail(s, variant_id)
    if detail is None:
        raise HTTPException(404, f"no reviewable variant {variant_id}")
    detail["urls"] = {"full": f"/assets/{detail['asset_id']}", "thumb": f"/thumbs/{detail['asset_id']}?w=640",
                      "page": f"/variants/{variant_id}"}
    if (detail.get("overlay") or {}).get("clean_key"):  # a branded asset: its picture without the overlay
        detail["urls"]["clean"] = f"/assets/{detail['asset_id']}/clean"
    return detail


@router.post("/api/variants/{variant_id}/review")
def api_review(request: Request, variant_id: Id, body: ReviewBody, user: Reviewer) -> dict[str, Any]:
    fields = body.model_fields_set
    change = ReviewChange(
        status=body.status,
        starred=body.starred,
        **({"group": body.group or None} if "group" in fields else {}),
    )
    state, changed = apply_review(request.app.state.db, variant_id, change, actor=user.name)
    return review_result(request, variant_id, state, changed)


@router.post("/api/variants/{variant_id}/rerender")
def api_rerender(request: Request, variant_id: Id, body: RerenderBody, user: Reviewer) -> dict[str, Any]:
    request_id, new = queue_rerender(request.app.state.db, variant_id, actor=user.name, samplers=request.app.state.samplers,
                                     overrides=body.model_dump(exclude_none=True))
    return {"variant_id": variant_id, "request_id": request_id, "queued": new}


# ------------------------------------------------------------------------------------------------ images


def _asset(request: Request, asset_id: int) -> Asset:
    with request.app.state.db.session() as s:
        asset = s.get(Asset, asset_id)
    if asset is None:
        raise HTTPException(404, "no such asset")
    return asset


@router.get("/thumbs/{asset_id}")
def thumbnail(request: Request, asset_id: Id, user: Viewer,
              w: Annotated[int, Query(description=f"one of {THUMB_WIDTHS}")] = 320) -> Response:
    if w not in THUMB_WIDTHS:
        raise HTTPException(404, f"thumbnail widths are {', '.join(map(str, THUMB_WIDTHS))}")
    asset = _asset(request, asset_id)
    blurred = withheld(asset)
    try:
        path = request.app.state.thumbs.get(request.app.state.store, asset.storage_key, asset.sha256, w, blurred=blurred)
    except KeyError:
        raise HTTPException(404, "the asset's file is missing from the store") from None
    if blurred:  # the same URL shows the real thumbnail once released: the blurred one must not be kept
        return FileResponse(path, media_type="image/webp", headers={"Cache-Control": "no-store", "X-Adforge-Flagged": "1"})
    # Content-addressed (sha256 + width): the browser may keep it as long as it likes, but only for this user.
    return FileResponse(path, media_type="image/webp", headers={"Cache-Control": "private, max-age=604800, immutable",
                                                                "ETag": f'"{asset.sha256[:32]}-{w}"'})


def _serve(request: Request, asset: Asset) -> Response:
    state = request.app.state
    if withheld(asset):  # for every role, admins too: a release (audited) comes first
        raise HTTPException(403, withheld_message(asset.id))
    try:
        return asset_response(state.store, asset.storage_key, asset.format, s3_delivery=state.s3_delivery,
                              presign_seconds=state.presign_seconds)
    except (KeyError, ValueError):
        raise HTTPException(404, "the asset's file is missing from the store") from None


@router.get("/assets/{asset_id}")
def full_size(request: Request, asset_id: Id, user: Viewer) -> Response:
    return _serve(request, _asset(request, asset_id))


@router.get("/files/{key:path}")
def by_key(request: Request, key: str, user: Viewer) -> Response:
    """A file by its storage key; only keys of recorded assets, never anything else in (or outside) the store."""
    if safe_key(key) is None:
        raise HTTPException(404, "no such file")
    with request.app.state.db.session() as s:
        asset = s.scalar(select(Asset).where(Asset.storage_key == key).limit(1))
    if asset is None:
        raise HTTPException(404, "no such file")
    return _serve(request, asset)


@router.post("/api/assets/{asset_id}/release")
def api_release(request: Request, asset_id: Id, user: Admin) -> dict[str, Any]:
    """Release a flagged asset (admins only, audited as ``asset.released``): from then on it is served and exported."""
    try:
        done = release_asset(request.app.state.db, asset_id, actor=user.name)
    except ReleaseError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"asset_id": asset_id, "released": True, "changed": done.changed, "released_by": done.released_by,
            "released_at": done.released_at}

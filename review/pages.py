"""Server-rendered pages: sign-in, campaigns, rows, the variant grid, detail, compare, results, exports.

Every page works without JavaScript (plain forms post and redirect back); ``static/gallery.js`` adds keyboard
review and the detail panel on top.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from review.actions import GROUPS, ReviewChange, apply_review, queue_rerender, set_review_settings
from review.audit_export import audit_export, to_csv, to_json
from review.export import ExportError, export_campaign
from review.files import asset_response, safe_key
from review.ids import Id, parse_id
from review.middleware import LimitedRoute, human_size
from review.queries import Filters, campaign_summaries, gallery, review_config, rows_overview, variant_detail
from review.results import METRICS, ResultsError, ab_tests, import_results
from review.security import (CurrentUser, client_address, csrf_token, current_user, end_session, optional_user,
                             require_role, start_session)
from review.signin import sign_in
from review.thumbs import THUMB_WIDTHS
from storage.releases import ReleaseError, release_asset, withheld, withheld_message
from storage.review_schema import REVIEW_STATUSES
from storage.schema import Asset, Campaign

__all__ = ["router"]

router = APIRouter(route_class=LimitedRoute)
Viewer = Annotated[CurrentUser, Depends(current_user)]
Reviewer = Annotated[CurrentUser, Depends(require_role("reviewer"))]
Admin = Annotated[CurrentUser, Depends(require_role("admin"))]
_CHUNK = 1024 * 1024
# Grid thumbnails loaded eagerly (the rest are lazy): about a screenful of cards at 1920x1080.
EAGER_THUMBS = 40


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    flashes = request.session.pop("flash", []) if "flash" in request.session else []
    base = {"user": optional_user(request), "csrf_token": csrf_token(request), "flashes": flashes, "groups": GROUPS}
    return request.app.state.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def flash(request: Request, message: str, kind: str = "info") -> None:
    request.session.setdefault("flash", [])
    request.session["flash"] = [*request.session["flash"], {"kind": kind, "text": message}][-5:]


def back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _safe_next(target: str | None) -> str:
    # Only paths on this site: "//evil.example" and "https://..." would make the sign-in an open redirect.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _campaign(request: Request, campaign_id: int) -> Campaign:
    with request.app.state.db.session() as s:
        campaign = s.get(Campaign, campaign_id)
    if campaign is None:
        raise HTTPException(404, f"no campaign {campaign_id}")
    return campaign


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "campaign"


# ------------------------------------------------------------------------------------------------ sign-in


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:
    return render(request, "login.html", {"next": _safe_next(next), "error": None, "name": ""})


@router.post("/login")
def login(request: Request, name: Annotated[str, Form()], password: Annotated[str, Form()],
          next: Annotated[str, Form()] = "/") -> Response:
    result = sign_in(request.app.state.db, name, password, address=client_address(request), config=request.app.state.config)
    if result.user is None:
        response = render(request, "login.html", {"next": _safe_next(next), "error": result.message, "name": name[:64]},
                          status=result.status)
        if result.retry_after:
            response.headers["Retry-After"] = str(result.retry_after)
        return response
    start_session(request, result.user)
    return back(_safe_next(next))


@router.post("/logout")
def logout(request: Request) -> Response:
    end_session(request)  # the session's row is revoked: a copy of the cookie no longer signs anyone in
    return back("/login")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


# ------------------------------------------------------------------------------------------------ campaigns and rows


@router.get("/")
def campaigns(request: Request, user: Viewer) -> Response:
    with request.app.state.db.session() as s:
        items = campaign_summaries(s)
    return render(request, "campaigns.html", {"campaigns": items})


@router.get("/campaigns/{campaign_id}")
def campaign_page(request: Request, campaign_id: Id, user: Viewer) -> Response:
    campaign = _campaign(request, campaign_id)
    with request.app.state.db.session() as s:
        config = review_config(s, campaign_id, request.app.state.defaults)
        rows = rows_overview(s, campaign_id, config.approvals_needed)
    return render(request, "campaign.html", {"campaign": campaign, "rows": rows, "config": config})


@router.post("/campaigns/{campaign_id}/settings")
def campaign_settings(request: Request, campaign_id: Id, user: Admin, approvals_needed: Annotated[int, Form()],
                      confidence: Annotated[float, Form()]) -> Response:
    set_review_settings(request.app.state.db, campaign_id, approvals_needed=approvals_needed, confidence=confidence,
                        actor=user.name, defaults=request.app.state.defaults)
    flash(request, f"Review settings saved: {approvals_needed} approvals per row and channel, {confidence:.0%} confidence.")
    return back(f"/campaigns/{campaign_id}")


# ------------------------------------------------------------------------------------------------ the grid


def _filters(status: str | None, channel: str | None, template: str | None, model: str | None, row: str | None,
             starred: str | None, group: str | None) -> Filters:
    def number(value: str | None, what: str) -> int | None:
        return parse_id(value, what) if value else None

    if status and status not in REVIEW_STATUSES:
        raise HTTPException(400, f"status must be one of {', '.join(REVIEW_STATUSES)}")
    if group and group not in GROUPS:
        raise HTTPException(400, f"group must be one of {', '.join(GROUPS)}")
    return Filters(status=status or None, channel=channel or None, template=template or None,
                   model=number(model, "model"), row=number(row, "row"), starred=starred in ("1", "on", "true"),
                   group=group or None)


@router.get("/campaigns/{campaign_id}/gallery")
def gallery_page(request: Request, campaign_id: Id, user: Viewer, status: str | None = None, channel: str | None = None,
                 template: str | None = None, model: str | None = None, row: str | None = None,
                 starred: str | None = None, group: str | None = None) -> Response:
    campaign = _campaign(request, campaign_id)
    filters = _filters(status, channel, template, model, row, starred, group)
    with request.app.state.db.session() as s:
        config = review_config(s, campaign_id, request.app.state.defaults)
        page = gallery(s, campaign_id, filters, config.approvals_needed)
    return render(request, "gallery.html", {"campaign": campaign, "page": page, "filters": filters, "config": config,
                                            "statuses": REVIEW_STATUSES, "thumb_width": THUMB_WIDTHS[1],
                                            "eager_thumbs": EAGER_THUMBS})


# ------------------------------------------------------------------------------------------------ one variant


@router.get("/variants/{variant_id}")
def variant_page(request: Request, variant_id: Id, user: Viewer) -> Response:
    with request.app.state.db.session() as s:
        detail = variant_detail(s, variant_id)
    if detail is None:
        raise HTTPException(404, f"no reviewable variant {variant_id}")
    return render(request, "variant.html", {"v": detail, "samplers": request.app.state.samplers.display})


@router.get("/assets/{asset_id}/clean")
def clean_file(request: Request, asset_id: Id, user: Viewer) -> Response:
    """A branded asset's picture without its overlay (beside the delivered one on the variant page). The same rules
    as ``/assets/{id}``: any signed-in user, only the key recorded for that asset, and only if the stores accept it
    (a tampered row cannot point outside the store); 404 for an asset without an overlay."""
    state = request.app.state
    with state.db.session() as s:
        asset = s.get(Asset, asset_id)
    if asset is None:
        raise HTTPException(404, "no such asset")
    if withheld(asset):
        raise HTTPException(403, withheld_message(asset.id))
    key = safe_key(asset.clean_key) if asset.clean_key else None
    if key is None:
        raise HTTPException(404, "this asset has no clean picture (it carries no brand overlay)")
    try:
        return asset_response(state.store, key, asset.format, s3_delivery=state.s3_delivery,
                              presign_seconds=state.presign_seconds)
    except (KeyError, ValueError):
        raise HTTPException(404, "the asset's clean picture is missing from the store") from None


@router.post("/assets/{asset_id}/release")
def asset_release(request: Request, asset_id: Id, user: Admin) -> Response:
    """The variant page's release button (a plain form; ``POST /api/assets/{id}/release`` is the same for scripts)."""
    try:
        done = release_asset(request.app.state.db, asset_id, actor=user.name)
    except ReleaseError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    with request.app.state.db.session() as s:
        asset = s.get(Asset, asset_id)
        variant_id = asset.variant_id if asset is not None else None
    flash(request, f"Asset {asset_id} released by {done.released_by}." if done.changed else
          f"Asset {asset_id} had already been released by {done.released_by}.")
    return back(f"/variants/{variant_id}")


@router.post("/variants/{variant_id}/review")
def variant_review(request: Request, variant_id: Id, user: Reviewer, status: Annotated[str | None, Form()] = None,
                   starred: Annotated[str | None, Form()] = None, group: Annotated[str | None, Form()] = None) -> Response:
    kwargs: dict[str, Any] = {}
    if status:
        kwargs["status"] = status
    if starred in ("0", "1"):
        kwargs["starred"] = starred == "1"
    if group is not None:
        kwargs["group"] = group or None  # the "no group" option posts an empty value
    _, changed = apply_review(request.app.state.db, variant_id, ReviewChange(**kwargs), actor=user.name)
    flash(request, "Saved." if changed else "Nothing changed.")
    return back(f"/variants/{variant_id}")


@router.post("/variants/{variant_id}/rerender")
def variant_rerender(request: Request, variant_id: Id, user: Reviewer, seed: Annotated[str | None, Form()] = None,
                     steps: Annotated[str | None, Form()] = None, cfg_scale: Annotated[str | None, Form()] = None,
                     sampler: Annotated[str | None, Form()] = None) -> Response:
    request_id, new = queue_rerender(request.app.state.db, variant_id, actor=user.name, samplers=request.app.state.samplers,
                                     overrides={"seed": seed, "steps": steps, "cfg_scale": cfg_scale, "sampler": sampler})
    flash(request, f"Re-render request #{request_id} " + ("queued." if new else "was already waiting in the queue."))
    return back(f"/variants/{variant_id}")


@router.get("/compare")
def compare_page(request: Request, user: Viewer, ids: str = "") -> Response:
    parts = [x for x in ids.split(",", 13) if x.strip()]
    if len(parts) > 12:
        raise HTTPException(400, "compare needs 2 to 12 variants")
    wanted = list(dict.fromkeys(parse_id(x, "ids (variant ids separated by commas)") for x in parts))
    if not 2 <= len(wanted) <= 12:
        raise HTTPException(400, "compare needs 2 to 12 variants")
    with request.app.state.db.session() as s:
        details = [variant_detail(s, vid) for vid in wanted]
    if any(d is None for d in details):
        raise HTTPException(404, "one of the variants does not exist")
    fields = ["channel", "template", "seed", "sampler", "steps", "cfg_scale", "clip_skip", "fast", "gen_size", "size",
              "format", "postprocess"]
    differs = {f for f in fields if len({str(d[f]) for d in details}) > 1}  # type: ignore[index]
    return render(request, "compare.html", {"items": details, "fields": fields, "differs": differs})


# ------------------------------------------------------------------------------------------------ export


def _stream(handle: IO[bytes]) -> Iterator[bytes]:
    try:
        while chunk := handle.read(_CHUNK):
            yield chunk
    finally:
        handle.close()


@router.post("/campaigns/{campaign_id}/export")
def export(request: Request, campaign_id: Id, user: Viewer, approved: Annotated[str | None, Form()] = None) -> Response:
    campaign = _campaign(request, campaign_id)
    approved_only = approved in ("1", "on", "true")
    handle = tempfile.TemporaryFile()
    try:
        result = export_campaign(request.app.state.db, request.app.state.store, campaign_id, handle,
                                 approved_only=approved_only, actor=user.name)
    except ExportError as exc:
        handle.close()
        flash(request, str(exc), "error")
        return back(f"/campaigns/{campaign_id}")
    name = f"{_slug(campaign.name)}-{'approved' if approved_only else 'all'}-export{result.export_id}.zip"
    return StreamingResponse(_stream(handle), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{name}"',
                                      "X-Export-Id": str(result.export_id), "X-Export-Sha256": result.zip_sha256,
                                      "X-Export-Withheld": str(len(result.withheld))})


# ------------------------------------------------------------------------------------------------ results


@router.get("/campaigns/{campaign_id}/results")
def results_page(request: Request, campaign_id: Id, user: Viewer, metric: str = "ctr") -> Response:
    if metric not in METRICS:
        raise HTTPException(400, f"metric must be one of {', '.join(METRICS)}")
    campaign = _campaign(request, campaign_id)
    with request.app.state.db.session() as s:
        config = review_config(s, campaign_id, request.app.state.defaults)
        tests = ab_tests(s, campaign_id, confidence=config.confidence, metric=metric)
    return render(request, "results.html", {"campaign": campaign, "tests": tests, "config": config, "metric": metric,
                                            "metrics": METRICS, "problems": []})


@router.post("/campaigns/{campaign_id}/results")
def results_upload(request: Request, campaign_id: Id, user: Reviewer, file: Annotated[UploadFile, File()]) -> Response:
    # A plain def: FastAPI runs it in a worker thread, so a long import does not hold up other requests.
    campaign = _campaign(request, campaign_id)
    limit = request.app.state.config.max_upload_bytes
    if file.size is not None and file.size > limit:  # the body cap stops a bigger one; this is the file's own limit
        raise HTTPException(413, f"results files are limited to {human_size(limit)}")
    source = file.filename or "upload.csv"
    file.file.seek(0)
    try:
        # The spooled upload itself, read as a stream: the file is never held in memory whole.
        summary = import_results(request.app.state.db, file.file, source, actor=user.name, campaign_id=campaign_id)
    except ResultsError as exc:
        with request.app.state.db.session() as s:
            config = review_config(s, campaign_id, request.app.state.defaults)
            tests = ab_tests(s, campaign_id, confidence=config.confidence)
        return render(request, "results.html", {"campaign": campaign, "tests": tests, "config": config, "metric": "ctr",
                                                "metrics": METRICS, "problems": exc.problems}, status=400)
    flash(request, f"Imported results for {summary.rows} asset(s); {summary.changed} changed.")
    return back(f"/campaigns/{campaign_id}/results")


# ------------------------------------------------------------------------------------------------ audit


@router.get("/campaigns/{campaign_id}/audit.{fmt}")
def audit_download(request: Request, campaign_id: Id, fmt: str, user: Viewer) -> Response:
    if fmt not in ("csv", "json"):
        raise HTTPException(404, "audit exports are .csv or .json")
    campaign = _campaign(request, campaign_id)
    export = audit_export(request.app.state.db, campaign_id)
    body = to_csv(export) if fmt == "csv" else to_json(export)
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    name = f"audit-{_slug(campaign.name)}.{fmt}"
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


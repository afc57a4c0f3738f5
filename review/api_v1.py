"""The REST API, ``/api/v1``: submit a brief, watch the run, list and fetch its assets, cancel; tokens; OpenAPI.

Authentication and limits: :mod:`review.api_auth`. The run id of this API is the submission's id
(:mod:`review.submissions`). Every refusal is ``{"error": {"code": "...", "message": "...", "problems": [...]}}``.
The schema (``/api/v1/openapi.json``) covers these routes only; ``/api/v1/docs`` lists them as plain HTML served
by the gallery itself (the CSP allows no CDN and no inline script).
"""

from __future__ import annotations

import html
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from review.api_auth import ApiError, ApiUser, RateLimiter, error_json, require_scope, session_only
from review.ids import Id
from review.middleware import LimitedRoute
from review.security import CurrentUser
from review.submission_views import asset_json
from review.submissions import (SubmissionError, brief_download, cancel_submission, check_brief, get_submission,
                                list_submissions, rerun_failures, submission_assets, submit_brief)
from review.tokens import TokenError, create_token, list_tokens, revoke_token
from storage.releases import withheld, withheld_message
from storage.schema import Asset

__all__ = ["install", "router"]

router = APIRouter(prefix="/api/v1", route_class=LimitedRoute, tags=["runs"])
Reader = Annotated[ApiUser, Depends(require_scope("read"))]
Submitter = Annotated[ApiUser, Depends(require_scope("submit"))]
SessionUser = Annotated[ApiUser, Depends(session_only)]
FORM_FIELDS = {"strict", "steps", "sampler", "cfg_scale", "fast", "webhook_url", "csrf_token", "brief"}


def _as_user(user: ApiUser) -> CurrentUser:
    return CurrentUser(user.id, user.name, user.role)


def _refuse(exc: SubmissionError | TokenError) -> ApiError:
    if isinstance(exc, TokenError):
        return ApiError(exc.status, exc.code, str(exc))
    return ApiError(exc.status, exc.code, exc.message, problems=exc.problems)


async def _upload(request: Request) -> tuple[bytes, str, dict[str, Any], str | None]:
    """(brief bytes, its file name, options, webhook_url) from a multipart form; unknown fields are refused."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with the brief in a 'brief' file field")
    form = await request.form()
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise ApiError(422, "unknown_option", f"unknown field(s) {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(FORM_FIELDS - {'csrf_token'}))})")
    brief = form.get("brief")
    if not isinstance(brief, UploadFile):
        raise ApiError(422, "missing_brief", "the 'brief' field must be a file (curl -F brief=@brief.csv)")
    data = await brief.read()
    options = {k: v for k, v in form.items() if k in FORM_FIELDS - {"brief", "webhook_url", "csrf_token"}}
    webhook = form.get("webhook_url")
    return data, brief.filename or "", options, webhook if isinstance(webhook, str) and webhook else None


@router.post("/runs", status_code=201, summary="Submit a brief (multipart) and start a run",
             responses={200: {"description": "an idempotent replay: the submission made earlier with this key"}})
async def post_run(request: Request, user: Submitter,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
                   dry_run: bool = False) -> Response:
    data, name, options, webhook = await _upload(request)
    from starlette.concurrency import run_in_threadpool

    try:
        if dry_run:
            return JSONResponse(await run_in_threadpool(check_brief, request.app.state, data, name, options))
        body, created = await run_in_threadpool(
            lambda: submit_brief(request.app.state, data, name, options, user=_as_user(user),
                                 idempotency_key=idempotency_key, webhook_url=webhook, token_id=user.token_id))
    except SubmissionError as exc:
        raise _refuse(exc) from None
    return JSONResponse(body, status_code=201 if created else 200, headers={"Location": f"/api/v1/runs/{body['id']}"})


@router.post("/plans", summary="Validate and plan a brief without starting anything")
async def post_plan(request: Request, user: Reader) -> dict[str, Any]:
    data, name, options, _ = await _upload(request)
    from starlette.concurrency import run_in_threadpool

    try:
        return await run_in_threadpool(check_brief, request.app.state, data, name, options)
    except SubmissionError as exc:
        raise _refuse(exc) from None


@router.get("/runs", summary="List runs, newest first")
def get_runs(request: Request, user: Reader, limit: Annotated[int, Query(ge=1, le=200)] = 50,
             offset: Annotated[int, Query(ge=0)] = 0, mine: bool = False) -> dict[str, Any]:
    runs = list_submissions(request.app.state, limit=limit, offset=offset, user=user.name if mine else None)
    return {"runs": runs, "limit": limit, "offset": offset}


@router.get("/runs/{run_id}", summary="A run's status, counts, progress and newest assets")
def get_run(request: Request, run_id: Id, user: Reader) -> dict[str, Any]:
    found = get_submission(request.app.state, run_id)
    if found is None:
        raise ApiError(404, "not_found", f"no run {run_id}")
    return found


@router.get("/runs/{run_id}/assets", summary="A run's assets, paged (flagged ones only once released)")
def get_run_assets(request: Request, run_id: Id, user: Reader, page: Annotated[int, Query(ge=1)] = 1,
                   per_page: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    try:
        return submission_assets(request.app.state, run_id, page=page, per_page=per_page)
    except SubmissionError as exc:
        raise _refuse(exc) from None


@router.post("/runs/{run_id}/cancel", summary="Cancel a queued or running run")
def post_cancel(request: Request, run_id: Id, user: Submitter) -> dict[str, Any]:
    try:
        return cancel_submission(request.app.state, run_id, user=_as_user(user))
    except SubmissionError as exc:
        raise _refuse(exc) from None


@router.post("/runs/{run_id}/rerun", status_code=201, summary="Run the same brief again (retries failed variants)")
def post_rerun(request: Request, run_id: Id, user: Submitter) -> Response:
    try:
        body, _ = rerun_failures(request.app.state, run_id, user=_as_user(user))
    except SubmissionError as exc:
        raise _refuse(exc) from None
    return JSONResponse(body, status_code=201)


@router.get("/runs/{run_id}/brief", summary="The run's brief, as uploaded")
def get_brief(request: Request, run_id: Id, user: Reader) -> Response:
    try:
        path, name = brief_download(request.app.state, run_id)
    except SubmissionError as exc:
        raise _refuse(exc) from None
    kind = "text/csv" if name.lower().endswith(".csv") else \
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    return FileResponse(path, media_type=kind, filename=name)


def _asset(request: Request, asset_id: int) -> Asset:
    with request.app.state.db.session() as s:
        asset = s.get(Asset, asset_id)
        if asset is None:
            raise ApiError(404, "not_found", f"no asset {asset_id}")
        if withheld(asset):
            raise ApiError(403, "withheld", withheld_message(asset_id))
        return asset


@router.get("/assets/{asset_id}", tags=["assets"], summary="An asset's metadata and download URL")
def get_asset(request: Request, asset_id: Id, user: Reader) -> dict[str, Any]:
    asset = _asset(request, asset_id)
    with request.app.state.db.session() as s:
        return asset_json(request.app.state, s, asset)


@router.get("/assets/{asset_id}/file", tags=["assets"], summary="The asset's file (or a redirect to a presigned URL)")
def get_asset_file(request: Request, asset_id: Id, user: Reader) -> Response:
    from review.files import asset_response

    asset, state = _asset(request, asset_id), request.app.state
    try:
        return asset_response(state.store, asset.storage_key, asset.format, s3_delivery=state.s3_delivery,
                              presign_seconds=state.presign_seconds)
    except (KeyError, ValueError):
        raise ApiError(404, "file_missing", "the asset's file is missing from the store") from None


@router.get("/assets/{asset_id}/thumb", tags=["assets"], summary="The asset's thumbnail (WebP; ?w= one of the widths)")
def get_asset_thumb(request: Request, asset_id: Id, user: Reader, w: Annotated[int, Query()] = 320) -> Response:
    from review.thumbs import THUMB_WIDTHS

    if w not in THUMB_WIDTHS:
        raise ApiError(422, "invalid_width", f"thumbnail widths are {', '.join(map(str, THUMB_WIDTHS))}")
    asset, state = _asset(request, asset_id), request.app.state
    try:
        path = state.thumbs.get(state.store, asset.storage_key, asset.sha256, w)
    except KeyError:
        raise ApiError(404, "file_missing", "the asset's file is missing from the store") from None
    return FileResponse(path, media_type="image/webp", headers={"Cache-Control": "private, max-age=604800, immutable"})


@router.get("/me", tags=["tokens"], summary="Who this request acts as")
def get_me(user: Reader) -> dict[str, Any]:
    return {"name": user.name, "role": user.role, "via": user.via, "scopes": list(user.scopes),
            "token_id": user.token_id}


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    scope: str = "read"
    user: str | None = None  # another user's token: admins only


@router.get("/tokens", tags=["tokens"], summary="Your tokens (an admin: everyone's, or ?user=)")
def get_tokens(request: Request, user: SessionUser, of: Annotated[str | None, Query(alias="user")] = None) -> dict:
    who = of if user.role == "admin" else user.name
    return {"tokens": [t.as_dict() for t in list_tokens(request.app.state.db, user_name=who)]}


@router.post("/tokens", tags=["tokens"], status_code=201, summary="Create a token (its text is shown once)")
def post_token(request: Request, body: TokenBody, user: SessionUser) -> dict:
    owner = body.user or user.name
    if owner != user.name and user.role != "admin":
        raise ApiError(403, "forbidden_role", "only admins create tokens for other users")
    try:
        text, info = create_token(request.app.state.db, owner, body.name, body.scope, actor=user.name)
    except TokenError as exc:
        raise _refuse(exc) from None
    return {"token": text, **info.as_dict()}


@router.post("/tokens/{token_id}/revoke", tags=["tokens"], summary="Revoke a token")
def post_revoke(request: Request, token_id: Id, user: SessionUser) -> dict:
    try:
        info = revoke_token(request.app.state.db, token_id, actor=user.name,
                            owner=None if user.role == "admin" else user.name)
    except TokenError as exc:
        raise _refuse(exc) from None
    return info.as_dict()


def _schema(app: FastAPI) -> dict:
    if getattr(app.state, "api_schema", None) is None:
        app.state.api_schema = get_openapi(title="adforge REST API", version="1", routes=router.routes,
                                           description="Runs from briefs: submit, watch, fetch assets, cancel.")
    return app.state.api_schema


@router.get("/openapi.json", tags=["docs"], include_in_schema=False)
def openapi_json(request: Request, user: Reader) -> dict:
    return _schema(request.app)


@router.get("/docs", tags=["docs"], include_in_schema=False, response_class=HTMLResponse)
def docs(request: Request, user: Reader) -> HTMLResponse:
    schema = _schema(request.app)
    items = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(f"{p['name']} ({p['in']})" for p in op.get("parameters", []))
            items.append(f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}</code>"
                         f"</td><td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td></tr>")
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>adforge REST API</title>"
            "<link rel='stylesheet' href='/static/app.css'></head><body><main><h1>adforge REST API v1</h1>"
            "<p>Authenticate with <code>Authorization: Bearer adf_…</code> (<code>adforge tokens create</code>). "
            "The machine-readable schema: <a href='/api/v1/openapi.json'>/api/v1/openapi.json</a>.</p>"
            "<table><thead><tr><th>method</th><th>path</th><th>what</th><th>parameters</th></tr></thead><tbody>"
            + "".join(items) + "</tbody></table></main></body></html>")
    return HTMLResponse(page)


def install(app: FastAPI, *, rate_per_minute: int, burst: int) -> None:
    """Add the router, its limiter and its error shape to ``app``."""
    app.state.api_limiter = RateLimiter(rate_per_minute, burst)
    app.state.api_schema = None

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_json(exc.status, exc.message, exc.code, exc.problems, exc.headers)

    app.include_router(router)

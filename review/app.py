"""The review gallery's web app: ``create_app(db_url, store_url, ...)`` returns a FastAPI app.

Pages (server-rendered Jinja2, autoescaped) and a small JSON API that the gallery's JavaScript uses for keyboard
review. Everything needs a signed-in user (``adforge users add``); every change needs the reviewer role and the
session's CSRF token, and is written to the audit log in the same transaction. Limits (request bodies, form
fields, sign-in failures, session length) come from :class:`review.config.GalleryConfig`; the layers that enforce
them before a route runs are in :mod:`review.middleware`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from review.actions import ActionError, SamplerNames
from review.api_auth import error_json
from review.config import GalleryConfig
from review.files import S3Delivery
from review.ids import MAX_ID
from review.middleware import ACCESS_LOGGER, AccessLog, BodyLimit, SecurityHeaders, SignedInGate, wants_json
from review.queries import ReviewConfig
from review.security import LoginRequired, csrf_guard, csrf_token, optional_user
from review.submissions import run_context
from review.thumbs import ThumbnailCache, default_cache_dir
from storage.assets import S3AssetStore, open_store
from storage.database import open_database

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
# Routes that take files: they get GalleryConfig.max_upload_bytes, every other route max_body_bytes.
UPLOAD_ROUTES = (("POST", re.compile(r"/campaigns/[^/]+/results")), ("POST", re.compile(r"/runs/new")),
                 ("POST", re.compile(r"/api/v1/(runs|plans)")))


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every page: a prompt holding <script> is text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["thumb_size"] = _thumb_size
    return Jinja2Templates(env=env)


def _thumb_size(width: int, height: int, box: int) -> tuple[int, int]:
    """The size a thumbnail of ``box`` will have: width/height attributes keep the grid from jumping as images load."""
    scale = min(box / width, box / height, 1.0) if width and height else 1.0
    return max(1, round(width * scale)), max(1, round(height * scale))


def _img_sources(store: object, s3_delivery: str) -> str:
    if isinstance(store, S3AssetStore) and s3_delivery == "presign":
        if store.endpoint_url:
            parts = urlsplit(store.endpoint_url)
            return f"'self' data: {parts.scheme}://{parts.netloc}"
        return "'self' data: https://*.amazonaws.com"
    return "'self' data:"


def create_app(
    db_url: str,
    store_url: str,
    *,
    secret_key: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    approvals_needed: int = 2,
    confidence: float = 0.95,
    s3_delivery: S3Delivery = "presign",
    presign_seconds: int = 300,
    secure_cookies: bool = False,
    config: GalleryConfig | None = None,
    samplers: Mapping[str, str] | None = None,
    price_per_device_hour: float = 0.0,
    run_config: str | None = None,
) -> FastAPI:
    """The gallery for one database and asset store.

    ``secret_key`` signs session cookies (default: random per process, so a restart signs everyone out);
    ``approvals_needed`` / ``confidence`` are the defaults for campaigns without their own review settings;
    ``s3_delivery`` is ``"presign"`` (redirect to a URL valid ``presign_seconds``) or ``"proxy"``;
    ``secure_cookies`` marks the session cookie Secure (serve over HTTPS then); ``config``: limits and account
    rules; ``samplers``: the sampler names a re-render may ask for, each accepted spelling -> its display name
    (the caller takes them from the engine, which this package must not import; without them a re-render cannot
    change the sampler); ``price_per_device_hour``: for the cost of runs that recorded no price of their own
    (the metrics page and ``/metrics``); ``run_config``: the adforge.toml that runs started from the web and
    the REST API use (review.submissions).
    """
    if s3_delivery not in ("presign", "proxy"):
        raise ValueError(f"s3_delivery must be 'presign' or 'proxy', got {s3_delivery!r}")
    if not 10 <= presign_seconds <= 3600:
        raise ValueError("presign_seconds must lie in 10 .. 3600: presigned URLs are meant to be short-lived")
    config = config or GalleryConfig()
    log_file = _access_log_file(config.access_log)
    db = open_database(db_url)
    store = open_store(store_url)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        db.dispose()
        if log_file is not None:
            logging.getLogger(ACCESS_LOGGER).removeHandler(log_file)
            log_file.close()

    app = FastAPI(title="adforge review gallery", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(csrf_guard)])
    app.state.db = db
    app.state.store = store
    app.state.thumbs = ThumbnailCache(cache_dir if cache_dir is not None else default_cache_dir())
    app.state.defaults = ReviewConfig(approvals_needed, confidence)
    app.state.s3_delivery = s3_delivery
    app.state.presign_seconds = presign_seconds
    app.state.templates = _templates()
    app.state.config = config
    app.state.samplers = SamplerNames(samplers or {})
    app.state.price_per_device_hour = price_per_device_hour
    app.state.runs = run_context(db_url, store_url, config, run_config, price_per_device_hour)
    img_src = _img_sources(store, s3_delivery)

    # No inline script anywhere: with this policy an injected <script> would not run even if escaping failed.
    security_headers = {
        "Content-Security-Policy": f"default-src 'self'; img-src {img_src}; script-src 'self'; style-src 'self'; "
                                   "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
    }

    def machine(request: Request) -> bool:
        return wants_json(request.scope)

    def error_page(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/v1/"):
            return error_json(status, message)
        if machine(request):
            return JSONResponse({"detail": message}, status_code=status)
        return app.state.templates.TemplateResponse(
            request, "error.html", {"status": status, "message": message, "user": optional_user(request),
                                    "csrf_token": csrf_token(request), "flashes": []}, status_code=status)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if request.url.path.startswith("/api/v1/"):
            return error_json(401, "send Authorization: Bearer <token>, or sign in to the gallery", "unauthenticated")
        if machine(request):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse(f"/login?next={exc.next_url}", status_code=303)

    def refused(request: Request, exc: Exception) -> Response:
        if isinstance(exc, LoginRequired):
            if request.url.path.startswith("/api/v1/"):
                return error_json(401, "send Authorization: Bearer <token>, or sign in to the gallery", "unauthenticated")
            return JSONResponse({"detail": "sign in first"}, status_code=401) if machine(request) else \
                RedirectResponse("/login", status_code=303)
        return error_page(request, getattr(exc, "status_code", 403), str(getattr(exc, "detail", exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(ActionError)
    async def action_error(request: Request, exc: ActionError) -> Response:
        return error_page(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        path_errors = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("path",)]
        if path_errors:
            # /assets/abc, /assets/-1, /assets/99999999999999999999: no such thing, said in one line.
            e = path_errors[0]
            shown = str(e.get("input", ""))
            shown = shown if len(shown) <= 40 else shown[:40] + "…"
            return error_page(request, 404, f"not found: {e['loc'][-1]} must be an id (1 .. {MAX_ID}), got {shown!r}")
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5])
        in_body = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
        return error_page(request, 422 if machine(request) and in_body else 400, problems or "invalid request")

    from review import api, api_v1, metrics_routes, pages  # the routers need app.state only at request time

    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(metrics_routes.router)
    api_v1.install(app, rate_per_minute=config.api_rate_per_minute, burst=config.api_burst)  # /api/v1 (issue 25)
    from review import run_pages, token_pages  # the run and token pages (issue 25)

    app.include_router(run_pages.router)
    app.include_router(token_pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    # Each layer added wraps the ones added before it. Innermost the gate (the session is there, nothing has read
    # the body yet); outermost the body cap and the access log, which so see every request, refused ones too.
    app.add_middleware(SignedInGate, refuse=refused)
    app.add_middleware(SecurityHeaders, headers=security_headers)
    app.add_middleware(SessionMiddleware, secret_key=secret_key or secrets.token_urlsafe(32),
                       session_cookie="adforge_session", max_age=config.session_hours * 3600, same_site="lax",
                       https_only=secure_cookies)
    app.add_middleware(BodyLimit, default=config.max_body_bytes,
                       routes=[(method, path, config.max_upload_bytes) for method, path in UPLOAD_ROUTES])
    app.add_middleware(AccessLog)
    return app


def _access_log_file(path: str | None) -> logging.Handler | None:
    """A file for the access log (besides whatever handles logger ``adforge.access``), None when not configured."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.setLevel(logging.INFO)
    if not path:
        return None
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"access log {path}: cannot open it: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return handler

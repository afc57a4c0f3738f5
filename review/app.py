"""The review gallery's web app: ``create_app(db_url, store_url, ...)`` returns a FastAPI app.

Pages (server-rendered Jinja2, autoescaped) and a small JSON API that the gallery's JavaScript uses for keyboard
review. Everything needs a signed-in user (``adforge users add``); every change needs the reviewer role and the
session's CSRF token, and is written to the audit log in the same transaction.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
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

from review.actions import ActionError
from review.files import S3Delivery
from review.queries import ReviewConfig
from review.security import LoginRequired, csrf_guard, csrf_token, optional_user
from review.thumbs import ThumbnailCache, default_cache_dir
from storage.assets import S3AssetStore, open_store
from storage.database import open_database

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
SESSION_HOURS = 12
# Paths whose clients are scripts or <img> tags: they get status codes, never a redirect to the sign-in page.
_MACHINE_PREFIXES = ("/api/", "/thumbs/", "/assets/", "/files/")


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
) -> FastAPI:
    """The gallery for one database and asset store.

    ``secret_key`` signs session cookies (default: random per process, so a restart signs everyone out);
    ``approvals_needed`` / ``confidence`` are the defaults for campaigns without their own review settings;
    ``s3_delivery`` is ``"presign"`` (redirect to a URL valid ``presign_seconds``) or ``"proxy"``;
    ``secure_cookies`` marks the session cookie Secure (serve over HTTPS then).
    """
    if s3_delivery not in ("presign", "proxy"):
        raise ValueError(f"s3_delivery must be 'presign' or 'proxy', got {s3_delivery!r}")
    if not 10 <= presign_seconds <= 3600:
        raise ValueError("presign_seconds must lie in 10 .. 3600: presigned URLs are meant to be short-lived")
    db = open_database(db_url)
    store = open_store(store_url)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        db.dispose()

    app = FastAPI(title="adforge review gallery", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(csrf_guard)])
    app.state.db = db
    app.state.store = store
    app.state.thumbs = ThumbnailCache(cache_dir if cache_dir is not None else default_cache_dir())
    app.state.defaults = ReviewConfig(approvals_needed, confidence)
    app.state.s3_delivery = s3_delivery
    app.state.presign_seconds = presign_seconds
    app.state.templates = _templates()
    img_src = _img_sources(store, s3_delivery)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        # No inline script anywhere: with this policy an injected <script> would not run even if escaping failed.
        response.headers.setdefault(
            "Content-Security-Policy",
            f"default-src 'self'; img-src {img_src}; script-src 'self'; style-src 'self'; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    # Added last = outermost: the session exists before the CSRF guard and the routes look at it.
    app.add_middleware(SessionMiddleware, secret_key=secret_key or secrets.token_urlsafe(32),
                       session_cookie="adforge_session", max_age=SESSION_HOURS * 3600, same_site="lax",
                       https_only=secure_cookies)

    def machine(request: Request) -> bool:
        return request.url.path.startswith(_MACHINE_PREFIXES)

    def error_page(request: Request, status: int, message: str) -> Response:
        if machine(request) or request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse({"detail": message}, status_code=status)
        return app.state.templates.TemplateResponse(
            request, "error.html", {"status": status, "message": message, "user": optional_user(request),
                                    "csrf_token": csrf_token(request), "flashes": []}, status_code=status)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if machine(request):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse(f"/login?next={exc.next_url}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(ActionError)
    async def action_error(request: Request, exc: ActionError) -> Response:
        return error_page(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_page(request, 422 if machine(request) else 400, problems or "invalid request")

    from review import api, pages  # the routers need app.state only at request time

    app.include_router(pages.router)
    app.include_router(api.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app

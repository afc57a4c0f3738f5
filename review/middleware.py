"""The layers in front of the gallery's routes (plain ASGI, so that they act before anything reads a body).

Outermost first: :class:`AccessLog` (one line per request), :class:`BodyLimit` (a body over its route's cap is
refused from its Content-Length, or cut off while it streams in), the session cookie, the security headers, and
:class:`SignedInGate` (a POST without a live session, or with a wrong CSRF header, is answered before its body is
read). FastAPI reads a route's body before it runs the route's dependencies, so these checks cannot be
dependencies. :class:`LimitedRoute` makes every form parse with the configured field limits.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import HTTPException
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from review.security import CSRF_HEADER, CSRF_REFUSED, UNSAFE_METHODS, LoginRequired, csrf_matches, is_form, optional_user

__all__ = ["AccessLog", "BodyLimit", "BodyTooLarge", "LimitedRoute", "SecurityHeaders", "SignedInGate", "human_size",
           "wants_json"]

ACCESS_LOGGER = "adforge.access"
# Paths whose clients are scripts or <img> tags: they get JSON and status codes, never a page or a redirect.
MACHINE_PREFIXES = ("/api/", "/thumbs/", "/assets/", "/files/")


def human_size(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def wants_json(scope: Scope) -> bool:
    return scope["path"].startswith(MACHINE_PREFIXES) or Headers(scope=scope).get("accept", "").startswith("application/json")


def _printable(text: str, limit: int) -> str:
    # A path is client-chosen: no newlines or escape sequences into a log a person reads in a terminal.
    text = re.sub(r"[\x00-\x20\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[:limit] + "…"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes its cap; the app's handler answers 413. FastAPI's own
    HTTPException: FastAPI lets that one through where it reads a body (any other error becomes a 400)."""

    def __init__(self, limit: int, method: str, path: str):
        super().__init__(413, f"request body over the {human_size(limit)} limit for {method} {_printable(path, 200)}")


class BodyLimit:
    """Caps request bodies per route: ``routes`` are (method, path pattern, bytes); everything else gets ``default``."""

    def __init__(self, app: ASGIApp, *, default: int, routes: Sequence[tuple[str, re.Pattern[str], int]] = ()):
        self.app, self.default, self.routes = app, default, tuple(routes)

    def limit_for(self, method: str, path: str) -> int:
        for m, pattern, limit in self.routes:
            if m == method and pattern.fullmatch(path):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        limit = self.limit_for(method, path)
        declared = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
        if declared:
            text = declared[0].decode("latin-1").strip()
            if len(set(declared)) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 19:
                return await self._refuse(scope, receive, send, 400, "invalid Content-Length header")
            if int(text) > limit:  # refused before a byte of the body is read
                return await self._refuse(scope, receive, send, 413, str(BodyTooLarge(limit, method, path).detail))
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # chunked bodies have no Content-Length: counted as they arrive
                    raise BodyTooLarge(limit, method, path)
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        response: Response = JSONResponse({"detail": message}, status) if wants_json(scope) else \
            PlainTextResponse(message + "\n", status)
        if scope["path"].startswith("/api/v1/"):  # the REST API's error shape (review.api_auth)
            response = JSONResponse({"error": {"code": "too_large" if status == 413 else "bad_request",
                                               "message": message}}, status)
        response.headers["Connection"] = "close"  # the unread body stays unread
        await response(scope, receive, send)


class SignedInGate:
    """State changes need a live session before anything reads their body. ``open_paths`` (the sign-in form) are
    let through; their small bodies are capped by :class:`BodyLimit` and checked for CSRF by the route."""

    def __init__(self, app: ASGIApp, *, refuse: Callable[[Request, Exception], Response],
                 open_paths: Sequence[str] = ("/login",)):
        self.app, self.refuse, self.open_paths = app, refuse, tuple(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        request = Request(scope)  # without receive: the body is not read here
        if scope["path"].startswith("/api/v1/") and "authorization" in request.headers:
            # A REST API token instead of a session (review.api_auth): checked here, before the body; no CSRF.
            from review.api_auth import ApiError, bearer_token, error_json

            try:
                await run_in_threadpool(bearer_token, request)
            except ApiError as exc:
                return await error_json(exc.status, exc.message, exc.code)(scope, receive, send)
            return await self.app(scope, receive, send)
        user = await run_in_threadpool(optional_user, request)
        if user is None:
            return await self.refuse(request, LoginRequired("/"))(scope, receive, send)
        sent = request.headers.get(CSRF_HEADER)
        # A form may carry the token in a field (checked by the route's guard); anything else must send the header.
        if (sent is not None or not is_form(request.headers.get("content-type", ""))) and not csrf_matches(request.session, sent):
            return await self.refuse(request, HTTPException(403, CSRF_REFUSED))(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Headers every response gets unless it set its own (plain ASGI: Starlette's BaseHTTPMiddleware runs the app in
    a task group, which turns an error raised while reading the body into an ExceptionGroup)."""

    def __init__(self, app: ASGIApp, *, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in self.headers if k not in present)]}
            await send(message)

        await self.app(scope, receive, with_headers)


class AccessLog:
    """One line per request to logger ``adforge.access``: time, address, user or -, method, path, status, ms."""

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None):
        self.app, self.logger = app, logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})  # optional_user leaves the signed-in user here
        status = 500  # what the server sends when the app fails before it answers

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                user = state.get("user")
                client = scope.get("client")
                target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
                if scope.get("query_string"):
                    target += "?" + scope["query_string"].decode("latin-1")
                when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                self.logger.info("%s %s %s %s %s %d %.1fms", when, client[0] if client else "-",
                                 getattr(user, "name", None) or "-", _printable(scope["method"], 16),
                                 _printable(target, 400), status, (time.perf_counter() - started) * 1000)


class _FormLimitedRequest(Request):
    def form(self, *, max_files: int | float = 0, max_fields: int | float = 0, max_part_size: int = 0):  # type: ignore[override]
        config = self.app.state.config
        return super().form(max_files=config.max_form_files, max_fields=config.max_form_fields,
                            max_part_size=config.max_field_bytes)


class LimitedRoute(APIRoute):
    """Every form this route parses (FastAPI's Form() parameters, the CSRF guard) stays within the configured
    number of fields and files and the size of a field: Starlette's own checks, with our numbers."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            return await handler(_FormLimitedRequest(request.scope, request.receive))

        return limited

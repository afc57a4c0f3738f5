"""Who is calling ``/api/v1``: a bearer token (``Authorization: Bearer adf_...``) or the gallery's session cookie.

A token request needs no CSRF token: a browser never adds an Authorization header to a cross-site request by
itself, so a forged request cannot carry it. :class:`review.middleware.SignedInGate` verifies a bearer token before
the body is read and leaves the result in the request's state (``api_token``), which this module and
:func:`review.security.csrf_guard` read. A session request keeps every rule it had (CSRF on POSTs).

Per-token rate limit: a token bucket per token id (``api_burst`` requests, refilled at ``api_rate_per_minute``);
an empty bucket answers 429 with Retry-After. Every refusal is ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from review.auth import has_role
from review.security import optional_user
from review.tokens import TokenUser, verify_token

__all__ = ["ApiError", "ApiUser", "RateLimiter", "api_user", "bearer_token", "error_json", "require_scope",
           "session_only"]

STATUS_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                409: "conflict", 410: "gone", 413: "too_large", 415: "unsupported_type", 422: "invalid_request",
                429: "rate_limited", 500: "internal_error", 502: "upstream_error"}
bearer = HTTPBearer(auto_error=False, description="An API token: `adforge tokens create USER --scope read|submit`.")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, problems: list | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.problems, self.headers = status, code, message, problems, headers


def error_json(status: int, message: str, code: str | None = None, problems: list | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict = {"code": code or STATUS_CODES.get(status, "error"), "message": message}
    if problems:
        body["problems"] = problems
    return JSONResponse({"error": body}, status_code=status, headers=headers)


@dataclass(frozen=True)
class ApiUser:
    id: int
    name: str
    role: str
    scopes: tuple[str, ...]
    token_id: int | None  # None: the session cookie

    @property
    def via(self) -> str:
        return "session" if self.token_id is None else "token"


class RateLimiter:
    """Token buckets by key; :meth:`take` returns 0 when a request may go, else the seconds until it may."""

    def __init__(self, per_minute: int, burst: int):
        self.rate, self.burst = per_minute / 60.0, float(burst)
        self._buckets: dict[object, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: object) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def bearer_token(request: Request) -> TokenUser | None:
    """The token the gate verified, or verify the Authorization header now (GET requests skip the gate)."""
    state = request.scope.setdefault("state", {})
    if "api_token" in state:
        return state["api_token"]
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, text = header.partition(" ")
    found = verify_token(request.app.state.db, text.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise ApiError(401, "invalid_token", "the bearer token is unknown, revoked, or its user is disabled")
    state["api_token"] = found
    return found


def api_user(request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiUser:
    token = bearer_token(request)
    if token is not None:
        limiter: RateLimiter = request.app.state.api_limiter
        wait = limiter.take(token.token_id)
        if wait > 0:
            raise ApiError(429, "rate_limited", f"too many requests with this token; retry in {math.ceil(wait)} s",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if "sid" not in request.session:  # the access log names the user (never mixed with a session's user)
            request.scope.setdefault("state", {})["user"] = token
        return ApiUser(token.user_id, token.name, token.role, token.scopes, token.token_id)
    user = optional_user(request)
    if user is None:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>, or sign in to the gallery")
    scopes = ("read", "submit") if has_role(user.role, "reviewer") else ("read",)
    return ApiUser(user.id, user.name, user.role, scopes, None)


def require_scope(scope: str):
    def dependency(user: Annotated[ApiUser, Depends(api_user)]) -> ApiUser:
        if scope == "submit" and not has_role(user.role, "reviewer"):
            raise ApiError(403, "forbidden_role", f"this needs the reviewer role; {user.name} is a {user.role}")
        if scope not in user.scopes:
            raise ApiError(403, "insufficient_scope", f"this token's scopes ({' '.join(user.scopes)}) do not "
                           f"include {scope!r}")
        return user

    return dependency


def session_only(user: Annotated[ApiUser, Depends(api_user)]) -> ApiUser:
    """Token management: with a session only, so that a leaked token cannot mint or revoke tokens."""
    if user.token_id is not None:
        raise ApiError(403, "session_required", "tokens are managed from a signed-in session or `adforge tokens`")
    return user

"""The completion webhook: a signed JSON POST to the submission's ``webhook_url`` when its run ends.

Signature: ``X-Adforge-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`` with
``X-Adforge-Timestamp: <unix seconds>`` (the timestamp is signed, so a receiver can refuse old replays). The secret
is the gallery's ``webhook_secret``. Sent from a background thread (never the request's), with a short timeout,
retried with backoff; the outcome is recorded on the submission (``webhook_state``). Receivers verify with
:func:`verify_signature`, or in a few lines of any language (see the README).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ATTEMPTS", "WebhookError", "check_url", "send_in_background", "sign", "verify_signature"]

log = logging.getLogger(__name__)
ATTEMPTS = 4
BACKOFF_SECONDS = (0.5, 2.0, 5.0)
TIMEOUT_SECONDS = 5.0


class WebhookError(ValueError):
    pass


def check_url(url: str) -> str:
    """An http(s) URL with a host, else WebhookError (file:, gopher:, javascript: ... are refused)."""
    if not isinstance(url, str) or len(url) > 2000 or not url.isprintable():
        raise WebhookError("webhook_url must be an http or https URL (at most 2000 characters)")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"webhook_url must be an http or https URL with a host, got scheme {parts.scheme or 'none'!r}")
    return url.strip()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *, max_age: float | None = 300) -> bool:
    """What a receiver does: the signature matches and (with ``max_age``) the timestamp is recent."""
    if max_age is not None:
        try:
            if abs(time.time() - int(timestamp)) > max_age:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def _post(url: str, secret: str, payload: dict[str, Any]) -> int:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "adforge-webhook/1",
        "X-Adforge-Timestamp": timestamp, "X-Adforge-Signature": sign(secret, timestamp, body),
        "X-Adforge-Event": "run.finished"})
    # Redirects are not followed: a webhook target redirecting elsewhere is a misconfiguration to surface.
    opener = urllib.request.build_opener(_NoRedirect)
    with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
        return response.status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[override]
        return None


def deliver(url: str, secret: str, payload: dict[str, Any], record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Send with retries (a 2xx is success; 4xx other than 408/429 is not retried); ``record`` gets the state after
    each attempt."""
    state: dict[str, Any] = {"state": "pending", "attempts": 0, "last_status": None, "error": None}
    for attempt in range(ATTEMPTS):
        state["attempts"] = attempt + 1
        retry = True
        try:
            status = _post(url, secret, payload)
            state.update(last_status=status, error=None)
            if 200 <= status < 300:
                state["state"] = "delivered"
        except urllib.error.HTTPError as exc:
            state.update(last_status=exc.code, error=f"HTTP {exc.code}")
            retry = exc.code >= 500 or exc.code in (408, 429)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            state.update(last_status=None, error=str(reason)[:300])
        state["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if state["state"] != "delivered" and (not retry or attempt == ATTEMPTS - 1):
            state["state"] = "failed"
        record(dict(state))
        if state["state"] != "pending":
            return state
        time.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])
    return state


def send_in_background(url: str, secret: str, payload: dict[str, Any],
                       record: Callable[[dict[str, Any]], None]) -> threading.Thread:
    def run() -> None:
        try:
            deliver(url, secret, payload, record)
        except Exception:
            log.exception("webhook to %s failed", urlsplit(url).hostname)

    thread = threading.Thread(target=run, name="adforge-webhook", daemon=True)
    thread.start()
    return thread

"""The gallery's limits and account rules: :class:`GalleryConfig`, passed to ``create_app``.

``adforge gallery`` fills it from the ``[gallery]`` table of adforge.toml (next to ``[adforge]``) and its flags;
tests build it directly. Every field has a default that suits a team's gallery on one machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ConfigError", "GalleryConfig"]

KB = 1024
MB = 1024 * 1024
MIN_TOKEN_CHARS = 24  # a guessable metrics token would hand the run figures to anyone who can reach the gallery


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class GalleryConfig:
    session_hours: int = 12
    # Request bodies: every route gets max_body_bytes; the results upload gets max_upload_bytes. Checked against
    # Content-Length before anything is read, and counted while a body streams in (chunked bodies have no length).
    max_body_bytes: int = 64 * KB
    max_upload_bytes: int = 20 * MB
    # Form parsing (Starlette's own limits, tighter than its defaults of 1000 fields and files).
    max_form_fields: int = 32
    max_form_files: int = 1
    max_field_bytes: int = 16 * KB
    # Sign-in: this many failures for one name within the window lock that name (whether or not such a user
    # exists, so the answer tells nothing) for lock_minutes; this many failures from one address within the
    # window refuse that address until they age out.
    account_failures: int = 5
    address_failures: int = 20
    failure_window_minutes: int = 15
    lock_minutes: int = 15
    access_log: str | None = None  # a file that gets the access log too (it always goes to logger adforge.access)
    # A bearer token that lets a Prometheus scraper read GET /metrics (signed-in admins may read it anyway); None:
    # no token is accepted. Also from ADFORGE_METRICS_TOKEN (adforge gallery), which keeps it out of a config file.
    metrics_token: str | None = None
    # Runs from the web and the REST API (review.submissions): the Prefect deployment ("flow/deployment") runs go
    # to, None = a local worker process per run (ADFORGE_DEPLOYMENT); the HMAC secret completion webhooks are
    # signed with, None = webhooks refused (ADFORGE_WEBHOOK_SECRET, which keeps it out of a config file); the folder
    # uploaded briefs are kept in, None = ./adforge-data/briefs.
    deployment: str | None = None
    webhook_secret: str | None = None
    briefs_dir: str | None = None
    # Per API token: a token bucket of api_burst requests, refilled at api_rate_per_minute (429 with Retry-After).
    api_rate_per_minute: int = 120
    api_burst: int = 30
    max_submissions_running: int = 4  # per user: queued or running submissions at once

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("deployment", "briefs_dir"):
                if value is not None and not (isinstance(value, str) and value.strip() and value.isprintable()):
                    raise ConfigError(f"gallery setting {f.name!r} must be a non-empty string, got {value!r}")
                if f.name == "deployment" and value is not None and value.count("/") != 1:
                    raise ConfigError(f"gallery setting 'deployment' must be FLOW/DEPLOYMENT "
                                      f"(e.g. 'campaign-run/campaign-run'), got {value!r}")
                continue
            if f.name == "webhook_secret":
                if value is not None and not (isinstance(value, str) and len(value) >= MIN_TOKEN_CHARS):
                    raise ConfigError(f"gallery setting 'webhook_secret' must be at least {MIN_TOKEN_CHARS} characters")
                continue
            if f.name == "access_log":
                if value is not None and not isinstance(value, str):
                    raise ConfigError(f"gallery setting 'access_log' must be a file path, got {value!r}")
                continue
            if f.name == "metrics_token":
                if value is not None and not (isinstance(value, str) and len(value) >= MIN_TOKEN_CHARS
                                              and value.isascii() and value.isprintable() and " " not in value):
                    raise ConfigError(f"gallery setting 'metrics_token' must be at least {MIN_TOKEN_CHARS} printable "
                                      f"ASCII characters without spaces (e.g. python -c 'import secrets; "
                                      f"print(secrets.token_urlsafe(32))')")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"gallery setting {f.name!r} must be a whole number >= 1, got {value!r}")
        if self.max_upload_bytes < self.max_body_bytes:
            raise ConfigError("gallery setting 'max_upload_bytes' must be at least 'max_body_bytes'")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "[gallery]") -> GalleryConfig:
        """From a TOML table; unknown keys are refused (a typo must not silently leave a limit at its default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown gallery setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

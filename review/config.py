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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "access_log":
                if value is not None and not isinstance(value, str):
                    raise ConfigError(f"gallery setting 'access_log' must be a file path, got {value!r}")
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

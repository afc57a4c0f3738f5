"""The review gallery's tables, on the same ``Base`` (and so the same migrations) as :mod:`storage.schema`.

* ``users``            who may sign in to the gallery, with which role (viewer | reviewer | admin); passwords
                       only as argon2 hashes.
* ``review_states``    the current review decision per variant: status, star, A/B group. A variant without a row
                       is pending. The *history* of decisions is the audit log; this table is the latest state only.
* ``review_settings``  per campaign: how many approved variants make a row and channel "ready", and the confidence
                       an A/B winner needs. A campaign without a row uses the gallery's defaults.
* ``sessions``         signed-in sessions, server side, so that signing out or a password change ends them.
* ``sign_in_attempts`` every sign-in attempt, for the per-account and per-address limits.
* ``rerender_queue``   "re-render with these settings" requests; the gallery only queues (it must not import the
                       engine), a worker drains the queue.
* ``exports``          every export zip made: by whom, which assets under which file names. Results files name
                       assets by those file names, so importing them needs this record.
* ``ab_results``       delivery results per asset (impressions, clicks, conversions), the latest import wins; every
                       import is in the audit log with before/after.
* ``submissions``      a run started from the web or the REST API (migration 0011): the stored brief, options, the
                       plan shown before start, who, how it was launched (local worker process or Prefect flow run),
                       its status, cancel and webhook state. Its id is the API's run id; ``runs.submission_id`` links
                       the run the flow recorded.
* ``api_tokens``       per-user REST API tokens, stored as sha256 only, with scopes ("read" or "read submit").

Kept equal to migration ``0002_review`` by ``tests/storage/test_database.py`` (autogenerate finds no difference).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from storage.schema import Base, utcnow

__all__ = [
    "ABResult",
    "ApiToken",
    "SUBMISSION_STATUSES",
    "Submission",
    "ExportRecord",
    "REVIEW_STATUSES",
    "ROLES",
    "RerenderRequest",
    "ReviewSettings",
    "ReviewState",
    "SessionRecord",
    "SignInAttempt",
    "User",
]

ROLES = ("viewer", "reviewer", "admin")
REVIEW_STATUSES = ("pending", "approved", "rejected")
SUBMISSION_STATUSES = ("queued", "running", "completed", "completed_with_failures", "failed", "cancelled")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | reviewer | admin
    password_hash: Mapped[str] = mapped_column(String(255))  # argon2id, PHC string format
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column()
    # Set after too many failed sign-ins in a row; sign-in is refused until then (an admin can clear it).
    locked_until: Mapped[dt.datetime | None] = mapped_column()


class SessionRecord(Base):
    """A signed-in session, server side: the cookie carries a random token, this row its sha256. Signing out,
    a password or role change, disabling or removing the user revoke the rows, so a copied cookie stops working."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie's token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    address: Mapped[str | None] = mapped_column(String(64))  # the client's address at sign-in


class SignInAttempt(Base):
    """Every sign-in attempt, for rate limits per account and per address (the audit log has the failures too)."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (Index("ix_sign_in_attempts_name_at", "name", "at"), Index("ix_sign_in_attempts_address_at", "address", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    name: Mapped[str] = mapped_column(String(64))  # as typed (cut to 64 characters); may name no user
    address: Mapped[str] = mapped_column(String(64))
    succeeded: Mapped[bool] = mapped_column(Boolean)


class ReviewState(Base):
    __tablename__ = "review_states"

    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | approved | rejected
    starred: Mapped[bool] = mapped_column(Boolean, default=False)
    ab_group: Mapped[str | None] = mapped_column(String(16))  # "A", "B", ... within the variant's row and channel
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255))


class ReviewSettings(Base):
    __tablename__ = "review_settings"

    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    approvals_needed: Mapped[int] = mapped_column(Integer)  # approved variants per row and channel for "ready"
    confidence: Mapped[float] = mapped_column(Float)  # e.g. 0.95: an A/B winner needs p < 1 - confidence
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255))


class RerenderRequest(Base):
    __tablename__ = "rerender_queue"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # queued | running | done | failed
    # Everything the worker needs, copied at request time so later edits of the source rows do not change it.
    settings: Mapped[dict[str, Any]] = mapped_column()
    requested_by: Mapped[str] = mapped_column(String(255))
    requested_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    result_variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id"))
    error: Mapped[str | None] = mapped_column(Text)


class ExportRecord(Base):
    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    approved_only: Mapped[bool] = mapped_column(Boolean)
    file_count: Mapped[int] = mapped_column(Integer)
    zip_sha256: Mapped[str] = mapped_column(String(64))
    # [{"asset_id": 1, "file_name": "...", "sha256": "..."}, ...]: how results files can name an asset.
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class ABResult(Base):
    __tablename__ = "ab_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"), unique=True)
    impressions: Mapped[int] = mapped_column(BigInteger)
    clicks: Mapped[int] = mapped_column(BigInteger)
    conversions: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(Text)  # the imported file's name
    imported_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    imported_by: Mapped[str] = mapped_column(String(255))


class ApiToken(Base):
    """A REST API token: ``Authorization: Bearer adf_...`` acts as ``user_id``, capped by ``scopes`` and the user's
    role. Only the sha256 of the (high-entropy, random) token is kept; ``prefix`` is what lists show."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(64))  # space-separated: "read" | "read submit"
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    last_used_at: Mapped[dt.datetime | None] = mapped_column()


class Submission(Base):
    """A run started from the web or the API (see the module docstring)."""

    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("submitted_by", "idempotency_key", name="uq_submissions_submitter_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    brief_name: Mapped[str] = mapped_column(String(255))  # the uploaded file's name, made safe; never used as given
    brief_sha256: Mapped[str] = mapped_column(String(64), index=True)
    brief_path: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    submitted_by: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # queued | running | completed | completed_with_failures | failed | cancelled
    status: Mapped[str] = mapped_column(String(32), default="queued", index=True)
    backend: Mapped[str] = mapped_column(String(255))  # "local" | "prefect:<deployment>"
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    pid: Mapped[int | None] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(255))
    run_id: Mapped[int | None] = mapped_column(Integer)  # runs.id (no FK: runs.submission_id points back here)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested_by: Mapped[str | None] = mapped_column(String(64))
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column()
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # {"state": "pending|delivered|failed", "attempts": n, "last_status": code, "error": text, "at": iso}
    webhook_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()

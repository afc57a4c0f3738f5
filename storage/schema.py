"""The metadata database's tables (SQLAlchemy 2 declarative models).

What each table answers for an auditor:

* ``models``      which file made an asset (path, sha256, A1111 short hash, family) and under which licence;
                  for a file adforge trained, its training record.
* ``campaigns``   the campaign names briefs use.
* ``briefs``      which spreadsheet (by content hash) a row came from.
* ``brief_rows``  the row as read (every column, extras included), where it is in the file.
* ``prompts``     the rendered prompt / negative prompt of a row for a channel and template variation.
* ``variants``    one planned image: its identity (a hash of everything that determines the pixels and the
                  delivered file), seed, generation settings, delivered size and format, status.
* ``variant_upscalers`` which upscaler model files (rows of ``models``) a variant's upscale chain uses, in chain
                  order: "which assets did upscaler X touch" is one join, and its licence is the model's row.
* ``assets``      the stored file of a variant: store, key, sha256, size, format, infotext.
* ``runs``        one execution of a brief (Prefect flow run id, settings, counts, timings, status).
* ``audit_log``   append-only: what happened, to what, by whom, before/after. Database triggers refuse
                  UPDATE and DELETE on it (see the migration), so the record cannot be edited quietly.

The schema is created and upgraded by the Alembic migrations in ``storage/migrations``; these models and
the migrations are kept equal by ``tests/storage/test_database.py`` (autogenerate finds no difference).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Asset",
    "AuditEntry",
    "Base",
    "Brief",
    "BriefRowRecord",
    "Campaign",
    "ModelRecord",
    "PromptRecord",
    "Run",
    "Variant",
    "VariantUpscaler",
    "utcnow",
]

# Named constraints, so that migrations can alter them on every backend (SQLite batch mode needs names).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime(timezone=True)}


class ModelRecord(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    short_hash: Mapped[str] = mapped_column(String(10))
    family: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32), default="checkpoint")  # checkpoint | vae | lora | upscaler
    license: Mapped[str | None] = mapped_column(String(128))
    # None = unknown: a brief row that needs commercial use refuses such a model until someone registers it.
    commercial_use: Mapped[bool | None] = mapped_column(Boolean)
    license_source: Mapped[str] = mapped_column(String(32), default="registered")  # registered | file-metadata
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # A file adforge trained (``adforge train lora``): canonical JSON of how (trainer, settings, image-set sha256,
    # trigger, base model name + sha256, steps, times). Text, not JSON: it is written once and read whole.
    training: Mapped[str | None] = mapped_column(Text)


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Brief(Base):
    __tablename__ = "briefs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    file_name: Mapped[str] = mapped_column(Text)  # as first seen; the same content under another name is one brief
    encoding: Mapped[str | None] = mapped_column(String(16))
    columns: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"columns": [...]} normalised header names
    first_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BriefRowRecord(Base):
    __tablename__ = "brief_rows"
    __table_args__ = (UniqueConstraint("brief_id", "campaign_id", "row_key", name="uq_brief_rows_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    brief_id: Mapped[int] = mapped_column(ForeignKey("briefs.id"))
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    row_key: Mapped[str] = mapped_column(String(255))  # the brief's row_id as written
    line: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column()  # every column as read, extras under "extra"

    campaign: Mapped[Campaign] = relationship()
    brief: Mapped[Brief] = relationship()


class PromptRecord(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("row_id", "channel", "template", "variation_index", name="uq_prompts_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    row_id: Mapped[int] = mapped_column(ForeignKey("brief_rows.id"))
    channel: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(128))
    variation_index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    brief_id: Mapped[int | None] = mapped_column(ForeignKey("briefs.id"))
    brief_path: Mapped[str] = mapped_column(Text)
    # running | completed | completed_with_failures | failed | crashed (its process died without reporting back)
    status: Mapped[str] = mapped_column(String(32), default="running")
    host: Mapped[str | None] = mapped_column(String(255))  # where the run's flow process ran, to detect crashes
    pid: Mapped[int | None] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # planned / rendered / skipped / failed / invalid_rows
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # seconds per stage
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    # The web or API submission that started this run (storage.review_schema.Submission), None for the CLI's runs.
    # No foreign key: see migration 0011 (SQLite could not add one without copying the table).
    submission_id: Mapped[int | None] = mapped_column(Integer, index=True)

    brief: Mapped[Brief | None] = relationship()


class Variant(Base):
    __tablename__ = "variants"
    __table_args__ = (Index("ix_variants_row_channel", "row_id", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # sha256 over everything that determines the delivered file; equal identity = the same asset.
    identity: Mapped[str] = mapped_column(String(64), unique=True)
    row_id: Mapped[int] = mapped_column(ForeignKey("brief_rows.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    first_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    channel: Mapped[str] = mapped_column(String(64))
    variant_index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    sampler: Mapped[str] = mapped_column(String(64))
    steps: Mapped[int] = mapped_column(Integer)
    cfg_scale: Mapped[float] = mapped_column(Float)
    clip_skip: Mapped[int] = mapped_column(Integer, default=1)
    gen_width: Mapped[int] = mapped_column(Integer)
    gen_height: Mapped[int] = mapped_column(Integer)
    out_width: Mapped[int] = mapped_column(Integer)
    out_height: Mapped[int] = mapped_column(Integer)
    out_format: Mapped[str] = mapped_column(String(8))
    out_max_kb: Mapped[int | None] = mapped_column(Integer)  # the channel's file size cap
    # "cover-lanczos(1080x1080)" (the default), or the canonical upscale chain with its model files pinned by sha256,
    # e.g. "hires(scale=2, denoise=0.4, upscaler=latent) -> model(4x.pth, sha256=...) -> fit(1080x1920)"
    postprocess: Mapped[str] = mapped_column(Text)
    # The LoRAs (with strengths) and embeddings it renders with, each pinned by its file's sha256, as canonical JSON
    # (storage.variants.adapters_text); "" = none. Each file has its row in ``models`` (kind lora | embedding).
    adapters: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    # The images the brief hands the engine (product packshot and mask with its placement, ControlNet layout with
    # its model), each pinned by sha256, as canonical JSON (storage.variants.inputs_text); "" = none.
    inputs: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    # The brand kit (name and content sha256) and the copy its delivered file carries, as canonical JSON
    # (storage.variants.OverlayPin); "" = no overlay.
    overlay: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    # The fast mode it renders with, as canonical text ("cache:3", "cache:3,tome:0.5"; engine.fast_modes); "" = exact.
    fast: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    storage_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="planned", index=True)  # planned | done | failed
    error: Mapped[str | None] = mapped_column(Text)
    # The run rendering it now: a run claims a variant before rendering it, in one atomic update, so two runs of
    # the same brief never render it twice. A claim of a run that finished or crashed is void.
    # (A plain run id, no foreign key: SQLite cannot add one to an existing table without rebuilding it.)
    claim_run_id: Mapped[int | None] = mapped_column(Integer)
    claimed_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    row: Mapped[BriefRowRecord] = relationship()
    prompt: Mapped[PromptRecord] = relationship()
    model: Mapped[ModelRecord] = relationship()
    asset: Mapped["Asset | None"] = relationship(back_populates="variant", uselist=False)
    upscalers: Mapped[list["VariantUpscaler"]] = relationship(order_by="VariantUpscaler.position", viewonly=True)


class VariantUpscaler(Base):
    __tablename__ = "variant_upscalers"

    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # the step's index in the chain
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)

    model: Mapped[ModelRecord] = relationship()


class Asset(Base):
    __tablename__ = "assets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"), unique=True)  # one file per variant, ever
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    store_url: Mapped[str] = mapped_column(Text)
    storage_key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    infotext: Mapped[str] = mapped_column(Text)
    render_seconds: Mapped[float | None] = mapped_column(Float)
    # For a variant with a product packshot: the mean absolute difference (0-255) between the delivered file's
    # decoded product pixels and the packshot's (0 for a PNG that kept it), and whether that is more than the file's
    # encoder explains (flows.product_check); both None for no packshot.
    product_error: Mapped[float | None] = mapped_column(Float)
    product_changed: Mapped[bool | None] = mapped_column(Boolean)
    # The product's outline as SVG path data in the file's pixels (engine.packshot.outline), for the gallery.
    product_outline: Mapped[str | None] = mapped_column(Text)
    # For a variant with a brand overlay: where the picture without it is stored (same store, format and size),
    # and what the overlay drew where (JSON: boxes, fitted sizes, colours, measured contrast, scrims).
    clean_key: Mapped[str | None] = mapped_column(Text)
    overlay: Mapped[str | None] = mapped_column(Text)
    # The image filter (flows.image_filter): True flagged, False passed, None not checked; its findings as JSON.
    # A flagged asset is stored but never exported or served until an admin releases it (released_by / _at).
    flagged: Mapped[bool | None] = mapped_column(Boolean, index=True)
    flags: Mapped[str | None] = mapped_column(Text)
    released_by: Mapped[str | None] = mapped_column(String(255))
    released_at: Mapped[dt.datetime | None] = mapped_column()
    # The invisible watermark's payload in the delivered file (hex), None for no mark; the C2PA manifest's label
    # when the file carries a signed manifest, None for unsigned.
    watermark: Mapped[str | None] = mapped_column(String(64), index=True)
    credentials: Mapped[str | None] = mapped_column(Text)
    queue_seconds: Mapped[float | None] = mapped_column(Float)  # the run's start to this image's render
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    variant: Mapped[Variant] = relationship(back_populates="asset")


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))  # "system:run" or a user name
    action: Mapped[str] = mapped_column(String(64))  # run.started, variant.planned, asset.stored, model.registered, ...
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    before: Mapped[dict[str, Any] | None] = mapped_column()
    after: Mapped[dict[str, Any] | None] = mapped_column()

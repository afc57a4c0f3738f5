"""One variant, one record: :class:`VariantSpec` holds every setting that determines a delivered file, and this
module owns the joins that read it back (variant -> prompt -> model -> row -> campaign).

Planning builds a spec per planned image, recording writes it, rendering reads it back and turns it into an engine
request, the gallery's re-render queue copies it, re-rendering rebuilds it from that copy. All of them go through
the spec's fields, so a new setting is declared once, here, with three facts in its field metadata:

* ``identity``: its key in the identity hash. A field added later (``since_default=True``) enters the hash only
  when it differs from its default, so every asset planned before the field existed keeps its identity.
* ``column``: the ``variants`` column that stores it (default: the field's name; ``None``: stored elsewhere,
  in ``prompts``, ``models`` or ``brief_rows``, and read back through the join).
* ``engine``: the engine request's argument it becomes (``None``: not an engine setting, e.g. the output format).

Adding a setting then touches this record, the schema and its migration, and the engine request; nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

from sqlalchemy import Select

from storage.assets import asset_key
from storage.image_metadata import EXTENSIONS
from storage.review_schema import ReviewState
from storage.schema import Asset, Brief, BriefRowRecord, Campaign, ModelRecord, PromptRecord, Variant

__all__ = ["OverlayPin", "overlay_text", "parse_overlay", "ControlPin", "ProductPin", "VariantInputs", "inputs_text", "parse_inputs", "AdapterPin", "ModelRef", "adapters_text", "describe_adapters", "parse_adapters", "StoredVariant", "VariantSpec", "load_variants", "spec_from_rows", "with_joins"]

_SAME = object()  # metadata default: "same as the field's name"


def _setting(identity: str, *, column: Any = _SAME, engine: Any = None, default: Any = MISSING,
             since_default: bool = False) -> Any:
    meta = {"identity": identity, "column": column, "engine": engine, "since_default": since_default}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass(frozen=True)
class VariantSpec:
    """Everything that determines one delivered file. Field order is the identity's historical order only by
    coincidence: the hash is over sorted keys."""

    # where the image belongs (stored through the row, campaign and prompt tables)
    campaign: str = _setting("campaign", column=None)
    row_key: str = _setting("row_id", column=None)
    channel: str = _setting("channel")
    template: str = _setting("template", column=None)
    variant_index: int = _setting("index")
    # what the engine renders
    prompt: str = _setting("prompt", column=None, engine="prompt")
    negative_prompt: str = _setting("negative", column=None, engine="negative_prompt")
    seed: int = _setting("seed", engine="seed")
    model_sha256: str = _setting("model", column=None)
    sampler: str = _setting("sampler", engine="sampler")
    steps: int = _setting("steps", engine="steps")
    cfg_scale: float = _setting("cfg", engine="cfg_scale")
    clip_skip: int = _setting("clip_skip", engine="clip_skip")
    gen_width: int = _setting("gen", engine="width")
    gen_height: int = _setting("gen", engine="height")
    # what is delivered
    out_width: int = _setting("out")
    out_height: int = _setting("out")
    out_format: str = _setting("format")
    out_max_kb: int | None = _setting("max_kb")
    postprocess: str = _setting("post")
    # LoRAs and embeddings, pinned by sha256 (canonical JSON, see :func:`adapters_text`); "" = none, which keeps the
    # identity of every variant planned before adapters existed.
    adapters: str = _setting("adapters", default="", since_default=True)
    # The images the brief hands the engine, pinned by sha256 (canonical JSON, see :func:`inputs_text`); "" = none.
    inputs: str = _setting("inputs", default="", since_default=True)
    # The brand overlay (kit name and content sha256, headline, body, CTA; canonical JSON, see :class:`OverlayPin`);
    # "" = none.
    overlay: str = _setting("overlay", default="", since_default=True)
    # The opt-in fast mode (feature caching, token merging: engine.fast_modes) as its canonical text, e.g. "cache:3";
    # "" = exact, which keeps the identity of every variant planned before fast modes existed. It changes the pixels.
    fast: str = _setting("fast", engine="fast", default="", since_default=True)

    # ------------------------------------------------------------------ identity

    @cached_property
    def identity(self) -> str:
        """sha256 over everything that determines the delivered file. Fields sharing a key (``gen``: width and
        height) hash as a list in field order, as they always did."""
        keyed: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["since_default"] and value == f.default:
                continue
            key = f.metadata["identity"]
            if key in keyed:
                previous = keyed[key]
                keyed[key] = (previous if isinstance(previous, list) else [previous]) + [value]
            elif key in _PAIRED:
                keyed[key] = [value]
            else:
                keyed[key] = value
        payload = json.dumps(keyed, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    @property
    def storage_key(self) -> str:
        """Where the file is stored: campaign / row / channel / ``vNN-sSEED-<identity prefix>.ext``."""
        return asset_key(self.campaign, self.row_key, self.channel, self.variant_index, self.seed,
                         EXTENSIONS[self.out_format], tag=self.identity[:10])

    # ------------------------------------------------------------------ conversions

    def engine_arguments(self) -> dict[str, Any]:
        """The engine request's keyword arguments (``GenerationRequest(**spec.engine_arguments())``)."""
        return {f.metadata["engine"]: getattr(self, f.name) for f in fields(self) if f.metadata["engine"]}

    def variant_columns(self) -> dict[str, Any]:
        """The settings stored on the ``variants`` row itself (the rest live in the joined rows)."""
        return {_column(f): getattr(self, f.name) for f in fields(self) if f.metadata["column"] is not None}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **fallback: Any) -> "VariantSpec":
        """The spec of a copy made by :meth:`as_dict` (extra keys are ignored). ``fallback`` fills fields the copy
        lacks: a field added later takes its default, one that copies from older versions never carried (the
        variant index of an early re-render request) comes from ``fallback``."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.name in fallback:
                values[f.name] = fallback[f.name]
        return cls(**values)


@dataclass(frozen=True)
class AdapterPin:
    """One model file a variant renders with besides its checkpoint: a LoRA (with its text-encoder and U-Net
    strengths), an embedding, or the SDXL refiner that finishes the image (with the share of the schedule the base
    runs first), by the name prompts or settings call it and the sha256 of the file it was planned with."""

    kind: str  # "lora" | "embedding" | "refiner"
    name: str
    sha256: str
    te: float | None = None
    unet: float | None = None
    switch: float | None = None  # refiner only

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "sha256": self.sha256}
        if self.kind == "lora":
            out.update(te=self.te, unet=self.unet)
        elif self.kind == "refiner":
            out.update(switch=self.switch)
        return out


def adapters_text(pins: tuple[AdapterPin, ...] | list[AdapterPin]) -> str:
    """The canonical text of a variant's adapters (its ``adapters`` setting): "" for none, else compact JSON with
    sorted keys, LoRAs first in prompt order, then embeddings in prompt order, then the refiner."""
    if not pins:
        return ""
    rank = {"lora": 0, "refiner": 2}
    ordered = sorted(pins, key=lambda p: rank.get(p.kind, 1))  # stable: prompt order within a kind
    return json.dumps([p.as_dict() for p in ordered], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_adapters(text: str) -> tuple[AdapterPin, ...]:
    """The pins of an ``adapters`` text (ValueError if it is not one :func:`adapters_text` wrote)."""
    if not text:
        return ()
    try:
        items = json.loads(text)
        return tuple(AdapterPin(kind=str(i["kind"]), name=str(i["name"]), sha256=str(i["sha256"]),
                                te=None if i.get("te") is None else float(i["te"]),
                                unet=None if i.get("unet") is None else float(i["unet"]),
                                switch=None if i.get("switch") is None else float(i["switch"])) for i in items)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"unreadable adapters record {text[:80]!r}: {exc}") from None


def describe_adapters(session, text: str) -> list[dict[str, Any]]:
    """A variant's adapters for people (the gallery, audit exports): each pin with its ``models`` row (name, path,
    hash, licence), in the variant's order. A pin whose row is gone still shows, with what the variant recorded."""
    from sqlalchemy import select

    try:
        pins = parse_adapters(text)
    except ValueError:
        return [{"kind": "unreadable", "name": text[:80], "sha256": "", "hash": "", "license": None}]
    rows = {m.sha256: m for m in session.scalars(select(ModelRecord).where(ModelRecord.sha256.in_({p.sha256 for p in pins})))} \
        if pins else {}
    out = []
    for pin in pins:
        m = rows.get(pin.sha256)
        out.append({**pin.as_dict(), "hash": pin.sha256[:12], "file": m.name if m else None, "path": m.path if m else None,
                    "family": m.family if m else None, "license": m.license if m else None,
                    "commercial_use": m.commercial_use if m else None})
    return out


@dataclass(frozen=True)
class ProductPin:
    """A row's product packshot: the image (and mask) by sha256 and file suffix, the name the brief gave it, and
    the canonical placement (engine.packshot.Placement)."""

    image: str
    suffix: str
    file: str
    placement: str
    mask: str | None = None
    mask_suffix: str | None = None


@dataclass(frozen=True)
class ControlPin:
    """A row's ControlNet layout: the image by sha256 and suffix, the name the brief gave it, its type, and the
    ControlNet model (sha256, name) with its weight and step window."""

    image: str
    suffix: str
    file: str
    type: str
    model: str
    model_name: str
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class VariantInputs:
    product: ProductPin | None = None
    control: ControlPin | None = None

    def __bool__(self) -> bool:
        return self.product is not None or self.control is not None


def inputs_text(inputs: VariantInputs) -> str:
    """The canonical text of a variant's input images (its ``inputs`` setting): "" for none, else compact JSON with
    sorted keys."""
    if not inputs:
        return ""
    out: dict[str, Any] = {}
    if inputs.product is not None:
        out["product"] = {k: v for k, v in asdict(inputs.product).items() if v is not None}
    if inputs.control is not None:
        out["control"] = asdict(inputs.control)
    return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_inputs(text: str) -> VariantInputs:
    """The inputs of an ``inputs`` text (ValueError if it is not one :func:`inputs_text` wrote)."""
    if not text:
        return VariantInputs()
    try:
        data = json.loads(text)
        product = ProductPin(**data["product"]) if "product" in data else None
        control = ControlPin(**data["control"]) if "control" in data else None
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"unreadable inputs record {text[:80]!r}: {exc}") from None
    return VariantInputs(product, control)


@dataclass(frozen=True)
class OverlayPin:
    """A variant's brand overlay: the kit by name and by the sha256 of its content (the YAML and every file it names,
    so a changed logo or font is a different overlay), the channel layout it uses, and the copy it carries."""

    brand: str
    kit: str  # sha256 of the kit's content
    layout: str  # the kit's layout name used for the channel ("default" when the kit has none of its own for it)
    headline: str = ""
    body: str = ""
    cta: str = ""


def overlay_text(pin: OverlayPin | None) -> str:
    """The canonical text of a variant's overlay (its ``overlay`` setting): "" for none, else compact JSON."""
    if pin is None:
        return ""
    return json.dumps(asdict(pin), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_overlay(text: str) -> OverlayPin | None:
    """The pin of an ``overlay`` text (ValueError if it is not one :func:`overlay_text` wrote)."""
    if not text:
        return None
    try:
        data = json.loads(text)
        return OverlayPin(**{k: str(v) for k, v in data.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"unreadable overlay record {text[:80]!r}: {exc}") from None


_PAIRED = frozenset(f.metadata["identity"] for f in fields(VariantSpec)
                    if sum(g.metadata["identity"] == f.metadata["identity"] for g in fields(VariantSpec)) > 1)


def _column(f) -> str:
    return f.name if f.metadata["column"] is _SAME else f.metadata["column"]


def spec_from_rows(variant: Variant, prompt: PromptRecord, model_sha256: str, row_key: str, campaign: str) -> VariantSpec:
    """The spec a stored variant was planned from: its own columns plus what the joined rows hold."""
    stored = {f.name: getattr(variant, _column(f)) for f in fields(VariantSpec) if f.metadata["column"] is not None}
    return VariantSpec(campaign=campaign, row_key=row_key, template=prompt.template, prompt=prompt.prompt,
                       negative_prompt=prompt.negative_prompt, model_sha256=model_sha256, **stored)


# ---------------------------------------------------------------------------------------------------- the joins

_JOINS = {
    "asset": (Asset, Asset.variant_id == Variant.id),
    "prompt": (PromptRecord, PromptRecord.id == Variant.prompt_id),
    "model": (ModelRecord, ModelRecord.id == Variant.model_id),
    "row": (BriefRowRecord, BriefRowRecord.id == Variant.row_id),
    "brief": (Brief, Brief.id == BriefRowRecord.brief_id),
    "campaign": (Campaign, Campaign.id == BriefRowRecord.campaign_id),
}


def with_joins(stmt: Select, *, asset: bool = False, prompt: bool = False, model: bool = False, row: bool = False,
               brief: bool = False, campaign: bool = False, review: bool = False) -> Select:
    """``stmt`` from ``variants`` joined to the tables asked for: the one place the variant's joins are spelled.
    ``asset`` keeps only stored variants; ``review`` is an outer join (a variant without a decision is pending);
    ``brief`` and ``campaign`` bring the row in too."""
    wanted = {"asset": asset, "prompt": prompt, "model": model, "row": row or brief or campaign, "brief": brief,
              "campaign": campaign}
    stmt = stmt.select_from(Variant)
    for name, (table, on) in _JOINS.items():
        if wanted[name]:
            stmt = stmt.join(table, on)
    if review:
        stmt = stmt.outerjoin(ReviewState, ReviewState.variant_id == Variant.id)
    return stmt


@dataclass(frozen=True)
class ModelRef:
    """A model file as the ``models`` table records it."""

    id: int
    sha256: str
    path: str
    name: str
    short_hash: str
    license: str | None

    @classmethod
    def of(cls, m: ModelRecord) -> "ModelRef":
        return cls(m.id, m.sha256, m.path, m.name, m.short_hash, m.license)


@dataclass(frozen=True)
class StoredVariant:
    """A recorded variant: its id, identity (as recorded), status and storage key, the spec it was planned from,
    and its model."""

    id: int
    identity: str
    spec: VariantSpec
    status: str
    storage_key: str
    model: ModelRef
    row_id: int
    prompt_id: int


def load_variants(session, variant_ids: list[int]) -> dict[int, StoredVariant]:
    """The recorded variants among ``variant_ids``, by id (missing ids are left out)."""
    from sqlalchemy import select

    out: dict[int, StoredVariant] = {}
    for i in range(0, len(variant_ids), 500):  # stay under SQLite's bound-parameter limit
        chunk = list(variant_ids[i : i + 500])
        stmt = with_joins(select(Variant, PromptRecord, ModelRecord, BriefRowRecord.row_key, Campaign.name),
                          prompt=True, model=True, campaign=True).where(Variant.id.in_(chunk))
        for v, p, m, row_key, campaign_name in session.execute(stmt):
            spec = spec_from_rows(v, p, m.sha256, row_key, campaign_name)
            out[v.id] = StoredVariant(v.id, v.identity, spec, v.status, v.storage_key, ModelRef.of(m), v.row_id, v.prompt_id)
    return out

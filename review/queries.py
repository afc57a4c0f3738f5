"""What the gallery shows, read from the metadata database: campaigns, rows, variant grids, one variant's record.

Only variants that have a stored asset are reviewable (a planned or failed variant has nothing to look at). A
variant without a ``review_states`` row is pending. "Ready" is counted per row and channel over *all* its
variants, whatever filter the page uses, so a filtered grid never shows a wrong readiness.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.review_schema import ABResult, RerenderRequest, ReviewSettings, ReviewState
from storage.schema import Asset, Brief, BriefRowRecord, Campaign, ModelRecord, PromptRecord, Run, Variant
from storage.variants import describe_adapters, parse_inputs, parse_overlay, with_joins

__all__ = [
    "Card",
    "Filters",
    "GalleryPage",
    "ReviewConfig",
    "RowSummary",
    "Section",
    "campaign_of_variant",
    "campaign_summaries",
    "gallery",
    "readiness",
    "review_config",
    "review_state_dict",
    "rows_overview",
    "variant_detail",
]


@dataclass(frozen=True)
class ReviewConfig:
    approvals_needed: int = 2
    confidence: float = 0.95


def review_config(s: Session, campaign_id: int, defaults: ReviewConfig) -> ReviewConfig:
    row = s.get(ReviewSettings, campaign_id)
    return ReviewConfig(row.approvals_needed, row.confidence) if row else defaults


def _status():
    # No review row = pending; one expression so that filters and counts agree.
    return func.coalesce(ReviewState.status, "pending")


# ------------------------------------------------------------------------------------------------ campaigns


@dataclass(frozen=True)
class CampaignSummary:
    id: int
    name: str
    created_at: dt.datetime
    rows: int
    variants: int
    approved: int
    rejected: int


def campaign_summaries(s: Session) -> list[CampaignSummary]:
    counts = {
        cid: (rows, total, approved, rejected)
        for cid, rows, total, approved, rejected in s.execute(
            with_joins(select(
                BriefRowRecord.campaign_id,
                func.count(func.distinct(Variant.row_id)),
                func.count(Variant.id),
                func.count(Variant.id).filter(_status() == "approved"),
                func.count(Variant.id).filter(_status() == "rejected"),
            ), asset=True, row=True, review=True)
            .group_by(BriefRowRecord.campaign_id)
        )
    }
    return [
        CampaignSummary(c.id, c.name, c.created_at, *counts.get(c.id, (0, 0, 0, 0)))
        for c in s.scalars(select(Campaign).order_by(Campaign.created_at.desc(), Campaign.id.desc()))
    ]


# ------------------------------------------------------------------------------------------------ readiness


@dataclass(frozen=True)
class Readiness:
    approved: int
    needed: int
    total: int

    @property
    def ready(self) -> bool:
        return self.approved >= self.needed


def readiness(s: Session, campaign_id: int, needed: int, *, row_id: int | None = None,
              channel: str | None = None) -> dict[tuple[int, str], Readiness]:
    """(row id, channel) -> approved / needed / total reviewable variants."""
    stmt = (
        with_joins(select(Variant.row_id, Variant.channel, func.count(Variant.id),
                          func.count(Variant.id).filter(_status() == "approved")), asset=True, row=True, review=True)
        .where(BriefRowRecord.campaign_id == campaign_id)
        .group_by(Variant.row_id, Variant.channel)
    )
    if row_id is not None:
        stmt = stmt.where(Variant.row_id == row_id)
    if channel is not None:
        stmt = stmt.where(Variant.channel == channel)
    return {(r, ch): Readiness(approved, needed, total) for r, ch, total, approved in s.execute(stmt)}


# ------------------------------------------------------------------------------------------------ rows


@dataclass
class RowSummary:
    id: int
    key: str
    line: int
    subject: str
    brief: str
    channels: dict[str, Readiness] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return bool(self.channels) and all(r.ready for r in self.channels.values())


def rows_overview(s: Session, campaign_id: int, needed: int) -> list[RowSummary]:
    ready = readiness(s, campaign_id, needed)
    rows: list[RowSummary] = []
    for row, brief_name in s.execute(
        select(BriefRowRecord, Brief.file_name)
        .join(Brief, Brief.id == BriefRowRecord.brief_id)
        .where(BriefRowRecord.campaign_id == campaign_id)
        .order_by(BriefRowRecord.row_key, BriefRowRecord.id)
    ):
        summary = RowSummary(row.id, row.row_key, row.line, str(row.data.get("subject", "")), brief_name)
        summary.channels = {ch: r for (rid, ch), r in sorted(ready.items()) if rid == row.id}
        rows.append(summary)
    return rows


# ------------------------------------------------------------------------------------------------ gallery grid


@dataclass(frozen=True)
class Filters:
    status: str | None = None  # pending | approved | rejected
    channel: str | None = None
    template: str | None = None
    model: int | None = None  # model id
    row: int | None = None  # brief row id
    starred: bool = False
    group: str | None = None

    def query(self) -> dict[str, str]:
        out = {k: str(v) for k, v in vars(self).items() if v not in (None, False, "")}
        if self.starred:
            out["starred"] = "1"
        return out


@dataclass(frozen=True)
class Card:
    variant_id: int
    asset_id: int
    row_id: int
    row_key: str
    channel: str
    variant_index: int
    template: str
    model_id: int
    model_name: str
    seed: int
    width: int
    height: int
    format: str
    prompt: str
    status: str
    starred: bool
    group: str | None
    product_changed: bool | None = None  # a packshot variant whose delivered product pixels differ (must not)
    product_outline: str | None = None  # SVG path data in the file's pixels
    flagged: bool | None = None  # the image filter's verdict (storage.releases)
    released_at: Any = None

    @property
    def withheld(self) -> bool:
        return bool(self.flagged) and self.released_at is None


@dataclass
class Section:
    row_id: int
    row_key: str
    channel: str
    readiness: Readiness
    cards: list[Card] = field(default_factory=list)


@dataclass
class GalleryPage:
    sections: list[Section]
    count: int
    options: dict[str, list[Any]]  # what the filter menus offer


def gallery(s: Session, campaign_id: int, filters: Filters, needed: int) -> GalleryPage:
    stmt = (
        _campaign_variants(select(
            Variant.id, Asset.id, Variant.row_id, BriefRowRecord.row_key, Variant.channel, Variant.variant_index,
            PromptRecord.template, ModelRecord.id, ModelRecord.name, Variant.seed, Asset.width, Asset.height, Asset.format,
            PromptRecord.prompt, _status(), func.coalesce(ReviewState.starred, False), ReviewState.ab_group,
            Asset.product_changed, Asset.product_outline, Asset.flagged, Asset.released_at,
        ), campaign_id)
        .order_by(BriefRowRecord.row_key, Variant.row_id, Variant.channel, Variant.variant_index, Variant.id)
    )
    f = filters
    if f.status:
        stmt = stmt.where(_status() == f.status)
    if f.channel:
        stmt = stmt.where(Variant.channel == f.channel)
    if f.template:
        stmt = stmt.where(PromptRecord.template == f.template)
    if f.model is not None:
        stmt = stmt.where(Variant.model_id == f.model)
    if f.row is not None:
        stmt = stmt.where(Variant.row_id == f.row)
    if f.starred:
        stmt = stmt.where(ReviewState.starred.is_(True))
    if f.group:
        stmt = stmt.where(ReviewState.ab_group == f.group)
    ready = readiness(s, campaign_id, needed, row_id=f.row, channel=f.channel)
    sections: dict[tuple[int, str], Section] = {}
    count = 0
    for values in s.execute(stmt):
        card = Card(*values)
        key = (card.row_id, card.channel)
        if key not in sections:
            sections[key] = Section(card.row_id, card.row_key, card.channel, ready.get(key, Readiness(0, needed, 0)))
        sections[key].cards.append(card)
        count += 1
    return GalleryPage(list(sections.values()), count, _filter_options(s, campaign_id))


def _campaign_variants(stmt, campaign_id: int):
    """``stmt`` over a campaign's stored variants with their asset, row, prompt, model and review state."""
    return with_joins(stmt, asset=True, row=True, prompt=True, model=True, review=True).where(
        BriefRowRecord.campaign_id == campaign_id)


def _filter_options(s: Session, campaign_id: int) -> dict[str, list[Any]]:
    base = (
        _campaign_variants(select(Variant.channel, PromptRecord.template, ModelRecord.id, ModelRecord.name, BriefRowRecord.id,
                                  BriefRowRecord.row_key, ReviewState.ab_group), campaign_id)
        .distinct()
    )
    channels, templates, models, rows, groups = set(), set(), set(), set(), set()
    for channel, template, model_id, model_name, row_id, row_key, group in s.execute(base):
        channels.add(channel)
        templates.add(template)
        models.add((model_id, model_name))
        rows.add((row_id, row_key))
        if group:
            groups.add(group)
    return {
        "channels": sorted(channels),
        "templates": sorted(templates),
        "models": sorted(models, key=lambda m: (m[1], m[0])),
        "rows": sorted(rows, key=lambda r: (r[1], r[0])),
        "groups": sorted(groups),
    }


# ------------------------------------------------------------------------------------------------ one variant


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _inputs(text: str, asset: Asset) -> dict[str, Any]:
    """A variant's input images for people: the product (file, hashes, placement, and how its delivered pixels
    compare with the packshot) and the ControlNet layout."""
    try:
        inputs = parse_inputs(text)
    except ValueError:
        return {"unreadable": text[:80]}
    out: dict[str, Any] = {}
    if inputs.product is not None:
        p = inputs.product
        out["product"] = {"file": p.file, "sha256": p.image, "mask_sha256": p.mask, "placement": p.placement,
                          "error": asset.product_error, "changed": asset.product_changed}
    if inputs.control is not None:
        c = inputs.control
        out["control"] = {"file": c.file, "sha256": c.image, "type": c.type, "model": c.model_name, "model_sha256": c.model,
                          "strength": c.strength, "start": c.start, "end": c.end}
    return out


# The overlay's elements in the order a reader meets them on the picture, with their names for people.
OVERLAY_ELEMENTS = {"logo": "Logo", "headline": "Headline", "body": "Body", "cta": "Call to action"}


def _number(value: Any) -> float | int | None:
    # bool is an int to Python, but a record saying "size": true is not a size.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _box(value: Any) -> list[float | int] | None:
    """A recorded [left, top, width, height]; None for anything else, so that a hand-edited or older record is shown
    without the boxes it cannot place rather than breaking the page."""
    if not isinstance(value, list) or len(value) != 4:
        return None
    numbers = [_number(n) for n in value]
    if any(n is None for n in numbers) or numbers[2] < 0 or numbers[3] < 0:  # type: ignore[operator]
        return None
    return numbers  # type: ignore[return-value]


def _overlay_element(name: str, drawn: dict[str, Any], moved: list[Any], floor: float | None) -> dict[str, Any]:
    """One drawn element for people: every key present (the templates are strict), None where the record has none."""
    contrast = _number(drawn.get("contrast"))
    floor = _number(drawn.get("min_contrast")) or floor  # a logo has its own floor (WCAG's 3:1 for graphics)
    return {
        "name": name, "label": OVERLAY_ELEMENTS[name], "text": _text(drawn.get("text")), "size": _number(drawn.get("size")),
        "variant": _text(drawn.get("variant")), "colour": _text(drawn.get("colour")), "choice": _text(drawn.get("choice")),
        "background": _text(drawn.get("background")), "scrim": _text(drawn.get("scrim")),
        "scrim_opacity": _number(drawn.get("scrim_opacity")), "contrast": contrast,
        "plate": _text(drawn.get("plate")), "plate_opacity": _number(drawn.get("plate_opacity")),
        "below_floor": contrast is not None and floor is not None and contrast < floor,
        "moved": name in moved, "box": _box(drawn.get("box")), "button": _box(drawn.get("button")),
        "panel": _box(drawn.get("panel")),
    }


def _overlay_boxes(safe: list[float | int] | None, elements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rectangles the "safe zones" view draws: the safe zone, each element's box, and the CTA's button."""
    boxes = [{"kind": "safe", "element": "safe", "box": safe}] if safe else []
    for e in elements:
        if e["box"]:
            boxes.append({"kind": "box", "element": e["name"], "box": e["box"]})
        if e["button"]:
            boxes.append({"kind": "button", "element": e["name"], "box": e["button"]})
    return boxes


def _overlay(asset: Asset, pin_text: str) -> dict[str, Any] | None:
    """A branded asset's overlay for people: brand and kit, what each element drew with its measured contrast, the
    boxes for the safe-zone view, and whether the clean picture is stored. None for an asset without an overlay."""
    if asset.overlay is None and asset.clean_key is None:
        return None
    try:
        pin = parse_overlay(pin_text)
    except ValueError:
        pin = None  # the asset's own record below still says what was drawn
    unreadable = None
    try:
        record = json.loads(asset.overlay) if asset.overlay else {}
    except ValueError:
        record, unreadable = {}, asset.overlay[:80]  # type: ignore[index]
    if not isinstance(record, dict):
        record, unreadable = {}, str(asset.overlay)[:80]
    # The boxes are in the delivered picture's pixels: its recorded size, else the file's (the same, by design).
    size = _box([0, 0, *record["size"]]) if isinstance(record.get("size"), list) else None
    width, height = (size[2], size[3]) if size and size[2] and size[3] else (asset.width, asset.height)
    moved = record.get("moved_for_product") if isinstance(record.get("moved_for_product"), list) else []
    floor = _number(record.get("min_contrast"))
    elements = [_overlay_element(name, record[name], moved, floor) for name in OVERLAY_ELEMENTS
                if isinstance(record.get(name), dict)]
    safe = _box(record.get("safe"))
    return {
        "brand": _text(record.get("brand")) or (pin.brand if pin else None),
        "kit": _text(record.get("kit")) or (pin.kit if pin else None),
        "layout": _text(record.get("layout")) or (pin.layout if pin else None),
        "layout_engine": _text(record.get("layout_engine")),
        "min_contrast": floor, "width": width, "height": height, "safe": safe, "elements": elements,
        "boxes": _overlay_boxes(safe, elements), "moved_for_product": [str(m) for m in moved],
        "clean_key": asset.clean_key, "recorded": bool(record), "unreadable": unreadable,
    }


def variant_detail(s: Session, variant_id: int) -> dict[str, Any] | None:
    """Everything the detail panel shows (and the audit export reuses): settings, model, row, run, review state."""
    found = s.execute(
        with_joins(select(Variant, Asset, PromptRecord, ModelRecord, BriefRowRecord, Brief, Campaign),
                   asset=True, prompt=True, model=True, brief=True, campaign=True)
        .where(Variant.id == variant_id)
    ).first()
    if found is None:
        return None
    variant, asset, prompt, model, row, brief, campaign = found
    state = s.get(ReviewState, variant.id)
    run = s.get(Run, asset.run_id) if asset.run_id else None
    requests = s.scalars(
        select(RerenderRequest).where(RerenderRequest.variant_id == variant.id).order_by(RerenderRequest.id.desc()).limit(5)
    ).all()
    result = s.scalar(select(ABResult).where(ABResult.asset_id == asset.id))
    return {
        "variant_id": variant.id,
        "asset_id": asset.id,
        "identity": variant.identity,
        "campaign": {"id": campaign.id, "name": campaign.name},
        "row": {"id": row.id, "key": row.row_key, "line": row.line, "data": row.data,
                "brief": {"id": brief.id, "file_name": brief.file_name, "sha256": brief.sha256}},
        "channel": variant.channel,
        "variant_index": variant.variant_index,
        "template": prompt.template,
        "variation_index": prompt.variation_index,
        "prompt": prompt.prompt,
        "negative_prompt": prompt.negative_prompt,
        "seed": variant.seed,
        "sampler": variant.sampler,
        "steps": variant.steps,
        "cfg_scale": variant.cfg_scale,
        "clip_skip": variant.clip_skip,
        "fast": variant.fast,
        "gen_size": f"{variant.gen_width}x{variant.gen_height}",
        "size": f"{variant.out_width}x{variant.out_height}",
        "format": variant.out_format,
        "postprocess": variant.postprocess,
        "adapters": describe_adapters(s, variant.adapters),
        "inputs": _inputs(variant.inputs, asset),
        "overlay": _overlay(asset, variant.overlay),
        "model": {"id": model.id, "name": model.name, "path": model.path, "sha256": model.sha256, "hash": model.short_hash,
                  "family": model.family, "license": model.license, "commercial_use": model.commercial_use},
        "asset": {"key": asset.storage_key, "url": asset.store_url, "sha256": asset.sha256, "bytes": asset.size_bytes,
                  "format": asset.format, "width": asset.width, "height": asset.height, "infotext": asset.infotext,
                  "created_at": _iso(asset.created_at)},
        "run": None if run is None else {"id": run.id, "status": run.status, "flow_run_id": run.flow_run_id,
                                         "brief_path": run.brief_path, "started_at": _iso(run.started_at),
                                         "finished_at": _iso(run.finished_at)},
        "first_run_id": variant.first_run_id,
        "review": review_state_dict(state),
        "rerender_requests": [{"id": r.id, "status": r.status, "requested_by": r.requested_by,
                               "requested_at": _iso(r.requested_at)} for r in requests],
        "results": None if result is None else {"impressions": result.impressions, "clicks": result.clicks,
                                                "conversions": result.conversions, "source": result.source},
        "filter": _filter(asset),
    }


def _filter(asset: Asset) -> dict[str, Any]:
    """The image filter's verdict: flagged (None: not checked), withheld (flagged and not yet released), findings."""
    try:
        findings = json.loads(asset.flags) if asset.flags else None
    except ValueError:
        findings = {"unreadable": asset.flags[:200]}
    return {"flagged": asset.flagged, "withheld": bool(asset.flagged) and asset.released_at is None, "findings": findings,
            "released_by": asset.released_by, "released_at": _iso(asset.released_at)}


def review_state_dict(state: ReviewState | None) -> dict[str, Any]:
    if state is None:
        return {"status": "pending", "starred": False, "group": None, "updated_by": None, "updated_at": None}
    return {"status": state.status, "starred": state.starred, "group": state.ab_group, "updated_by": state.updated_by,
            "updated_at": _iso(state.updated_at)}


def campaign_of_variant(s: Session, variant_id: int) -> tuple[int, int, str] | None:
    """(campaign id, row id, channel) of a reviewable variant, None if there is no such variant with an asset."""
    found = s.execute(
        with_joins(select(BriefRowRecord.campaign_id, Variant.row_id, Variant.channel), row=True, asset=True)
        .where(Variant.id == variant_id)
    ).first()
    return None if found is None else (found[0], found[1], found[2])


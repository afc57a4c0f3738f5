"""Export: the final files of a campaign as one zip, named by each channel's convention, with a manifest.

Zip layout::

    manifest.csv                                         asset_id, campaign, row, channel, group, file_name, sha256, licence, ...
    spring-launch_hero-01_instagram-square_1080x1080_A.jpg   ("_" separates fields, so never appears inside one)
    spring-launch_hero-01_728x90_B.png                   (IAB display units are named by size)

Every file is checked against its recorded sha256 while it is read, so a zip never carries a file that changed in
the store since it was recorded. Entries get a fixed timestamp: the same selection gives a byte-identical zip.
Each export is recorded (``exports``: who, when, which asset under which file name) and audited; results files
that name assets by file name are resolved through that record. A flagged asset no admin has released
(:mod:`storage.releases`) is never in a zip: the export leaves it out and says how many it left out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import string
import unicodedata
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from review.csvutil import safe_cell
from storage.assets import AssetStore, validate_key
from storage.database import Database, audit
from storage.releases import withheld
from storage.review_schema import ExportRecord, ReviewState
from storage.schema import Asset, BriefRowRecord, Campaign, ModelRecord, Variant
from storage.variants import with_joins

__all__ = [
    "CHANNEL_PATTERNS",
    "DEFAULT_PATTERN",
    "ExportError",
    "ExportResult",
    "ExportedFile",
    "MANIFEST_COLUMNS",
    "export_campaign",
    "find_campaign",
]

DEFAULT_PATTERN = "{campaign}_{row}_{channel}_{width}x{height}_{label}.{ext}"
CHANNEL_PATTERNS = {
    # Display ad units are trafficked by size: ad servers and agencies key creative names on WxH.
    "leaderboard": "{campaign}_{row}_{width}x{height}_{label}.{ext}",
    "skyscraper": "{campaign}_{row}_{width}x{height}_{label}.{ext}",
    # Printers ask for trim size and resolution in the name.
    "print_a4": "{campaign}_{row}_A4-300dpi_{label}.{ext}",
}
PLACEHOLDERS = {"campaign", "row", "channel", "width", "height", "label", "group", "index", "seed", "asset_id", "ext"}
MANIFEST_COLUMNS = [
    "asset_id", "campaign", "row", "channel", "group", "file_name", "sha256", "licence",
    "variant_id", "status", "model", "model_sha256", "commercial_use", "seed", "width", "height", "format",
]
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: reproducible archives
# File systems take 255 bytes per name; unzip tools add suffixes of their own. A longer part of a name is cut and
# gets a hash of the whole part, so two long names stay two names.
MAX_PART_BYTES = 150
MAX_NAME_BYTES = 1000
MAX_SPEC_NUMBER = 255  # widths and precisions in {seed:>20}: more only makes huge names (or none at all)
_SAMPLE = {"campaign": "c", "row": "r", "channel": "ch", "width": 1, "height": 1, "label": "A", "group": "A",
           "index": "01", "seed": 1, "asset_id": 1, "ext": "png"}


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExportedFile:
    asset_id: int
    campaign: str
    row: str
    channel: str
    group: str
    file_name: str
    sha256: str
    licence: str
    variant_id: int
    status: str
    model: str
    model_sha256: str
    commercial_use: str
    seed: int
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class ExportResult:
    export_id: int
    campaign: str
    files: list[ExportedFile]
    zip_sha256: str
    zip_bytes: int
    withheld: tuple[int, ...] = ()  # flagged, unreleased assets left out (ids)


def find_campaign(s: Session, ref: str | int) -> Campaign | None:
    """A campaign by name, or by id when no campaign has that name."""
    if isinstance(ref, int):
        return s.get(Campaign, ref)
    found = s.scalar(select(Campaign).where(Campaign.name == ref))
    if found is None and ref.isdigit():
        found = s.get(Campaign, int(ref))
    return found


def _slug(text: str) -> str:
    folded = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9.-]+", "-", folded).strip("-.") or "x"


def check_pattern(pattern: str) -> str:
    shown = pattern if len(pattern) <= 80 else pattern[:80] + "…"
    if len(pattern.encode("utf-8")) > MAX_NAME_BYTES:
        raise ExportError(f"file name pattern {shown!r}: longer than {MAX_NAME_BYTES} bytes")
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:  # a lone "{" or "}"
        raise ExportError(f"file name pattern {shown!r}: {exc}") from None
    fields = {name for _, name, _, _ in parsed if name is not None}
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ExportError(f"file name pattern {shown!r}: unknown placeholder(s) {sorted(unknown)} "
                          f"(known: {', '.join(sorted(PLACEHOLDERS))})")
    for _, name, spec, _ in parsed:
        if not spec:
            continue
        if "{" in spec or "}" in spec:
            raise ExportError(f"file name pattern {shown!r}: {{{name}:...}} may not hold another placeholder")
        if any(len(n) > 3 or int(n) > MAX_SPEC_NUMBER for n in re.findall(r"\d+", spec)):
            spec_shown = spec if len(spec) <= 20 else spec[:20] + "…"
            raise ExportError(f"file name pattern {shown!r}: width or precision in {{{name}:{spec_shown}}} is over "
                              f"{MAX_SPEC_NUMBER}")
    try:
        pattern.format(**_SAMPLE)  # a format spec that does not fit the value ({campaign:d}) fails here, not mid-export
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ExportError(f"file name pattern {shown!r}: {exc}") from None
    return pattern


def _cut_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def cap_name(name: str) -> str:
    """``name`` with each "/"-separated part at most MAX_PART_BYTES (UTF-8): a longer part keeps its start and its
    extension and gets "~" + 10 hex of its sha256, so different long parts stay different."""
    parts = name.split("/")
    for i, part in enumerate(parts):
        if len(part.encode("utf-8")) <= MAX_PART_BYTES:
            continue
        stem, dot, ext = part.rpartition(".")
        ext = f".{ext}" if dot and stem and len(ext.encode("utf-8")) <= 16 else ""
        stem = stem if ext else part
        tag = "~" + hashlib.sha256(part.encode("utf-8")).hexdigest()[:10]
        parts[i] = _cut_utf8(stem, MAX_PART_BYTES - len(tag) - len(ext.encode("utf-8"))) + tag + ext
    capped = "/".join(parts)
    if len(capped.encode("utf-8")) > MAX_NAME_BYTES:
        raise ExportError(f"file name {capped[:60]!r}… is longer than {MAX_NAME_BYTES} bytes even with each part cut to "
                          f"{MAX_PART_BYTES}; use a pattern with fewer '/' parts")
    return capped


def _names(items: list[dict[str, Any]], naming: dict[str, str]) -> list[str]:
    """File names per item. The label is the A/B group (or ``vNN`` without one); where two files would get one name,
    those files get the variant index, then the start of their identity hash added."""

    def render(item: dict[str, Any], label: str) -> str:
        values = {
            "campaign": _slug(item["campaign"]), "row": _slug(item["row"]), "channel": _slug(item["channel"]),
            "width": item["width"], "height": item["height"], "label": label, "group": item["group"] or "",
            "index": f"{item['index']:02d}", "seed": item["seed"], "asset_id": item["asset_id"], "ext": item["ext"],
        }
        pattern = naming.get(item["channel"], CHANNEL_PATTERNS.get(item["channel"], DEFAULT_PATTERN))
        try:
            name = cap_name(pattern.format(**values))
        except (ValueError, TypeError) as exc:
            raise ExportError(f"file name pattern {pattern[:80]!r} for asset {item['asset_id']}: {exc}") from None
        try:
            return validate_key(name)  # no absolute paths, '..' or backslashes inside the zip (zip-slip)
        except ValueError as exc:
            raise ExportError(f"file name pattern gives an unsafe name: {exc}") from None

    labels: list[list[str]] = []
    for item in items:
        base = item["group"] or f"v{item['index']:02d}"
        options = [base, f"{base}-v{item['index']:02d}"] if item["group"] else [base]
        labels.append(options + [f"{options[-1]}-{item['identity'][:8]}"])
    level = [0] * len(items)
    names = [render(item, labels[i][0]) for i, item in enumerate(items)]
    while True:
        clashes = {n for n, c in Counter(names).items() if c > 1}
        if not clashes:
            return names
        moved = False
        for i, item in enumerate(items):
            if names[i] in clashes and level[i] + 1 < len(labels[i]):
                level[i] += 1
                names[i] = render(item, labels[i][level[i]])
                moved = True
        if not moved:
            raise ExportError("the file name pattern gives the same name to different files; add {label} or {asset_id}")


def _select(s: Session, campaign: Campaign, approved_only: bool) -> list[dict[str, Any]]:
    stmt = (
        with_joins(select(Asset, Variant, BriefRowRecord.row_key, ModelRecord, ReviewState),
                   asset=True, row=True, model=True, review=True)
        .where(BriefRowRecord.campaign_id == campaign.id)
        .order_by(BriefRowRecord.row_key, Variant.row_id, Variant.channel, ReviewState.ab_group, Variant.variant_index, Variant.id)
    )
    if approved_only:
        stmt = stmt.where(ReviewState.status == "approved")
    items = []
    for asset, variant, row_key, model, state in s.execute(stmt):
        items.append({
            "withheld": withheld(asset),
            "asset_id": asset.id, "variant_id": variant.id, "identity": variant.identity, "campaign": campaign.name,
            "row": row_key, "channel": variant.channel, "group": state.ab_group if state else None,
            "status": state.status if state else "pending", "index": variant.variant_index, "seed": variant.seed,
            "width": asset.width, "height": asset.height, "format": asset.format, "ext": _EXT.get(asset.format, asset.format),
            "key": asset.storage_key, "sha256": asset.sha256, "licence": model.license or "unknown", "model": model.name,
            "model_sha256": model.sha256,
            "commercial_use": {True: "yes", False: "no", None: "unknown"}[model.commercial_use],
        })
    return items


def _manifest(files: list[ExportedFile]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=MANIFEST_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for f in files:
        writer.writerow({k: safe_cell(v) for k, v in asdict(f).items()})
    return out.getvalue().encode("utf-8")


def export_campaign(db: Database, store: AssetStore, campaign_ref: str | int, out: IO[bytes], *, approved_only: bool,
                    actor: str, naming: dict[str, str] | None = None) -> ExportResult:
    """Write the zip to ``out`` (seekable, left at position 0), record the export, return what it holds."""
    naming = {ch: check_pattern(p) for ch, p in (naming or {}).items()}
    with db.session() as s:
        campaign = find_campaign(s, campaign_ref)
        if campaign is None:
            raise ExportError(f"no campaign {campaign_ref!r}")
        campaign_id, campaign_name = campaign.id, campaign.name
        items = _select(s, campaign, approved_only)
    kept_out = tuple(item["asset_id"] for item in items if item["withheld"])
    items = [item for item in items if not item["withheld"]]
    if not items:
        flagged = f" ({len(kept_out)} flagged, awaiting an admin's release)" if kept_out else ""
        raise ExportError(f"campaign {campaign_name!r} has no {'approved ' if approved_only else ''}assets to export{flagged}")
    names = _names(items, naming)
    files: list[ExportedFile] = []
    with zipfile.ZipFile(out, "w") as zf:
        for item, name in zip(items, names):
            try:
                data = store.get(item["key"])
            except KeyError:
                raise ExportError(f"asset {item['asset_id']}: {item['key']} is missing from the store") from None
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise ExportError(f"asset {item['asset_id']}: {item['key']} differs from its recorded sha256; not exported")
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED  # already compressed images: deflate would only cost time
            zf.writestr(info, data)
            files.append(ExportedFile(
                asset_id=item["asset_id"], campaign=item["campaign"], row=item["row"], channel=item["channel"],
                group=item["group"] or "", file_name=name, sha256=item["sha256"], licence=item["licence"],
                variant_id=item["variant_id"], status=item["status"], model=item["model"], model_sha256=item["model_sha256"],
                commercial_use=item["commercial_use"], seed=item["seed"], width=item["width"], height=item["height"],
                format=item["format"],
            ))
        info = zipfile.ZipInfo("manifest.csv", date_time=_FIXED_TIME)
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, _manifest(files))
    size = out.tell()
    out.seek(0)
    digest = hashlib.file_digest(out, "sha256").hexdigest()
    out.seek(0)
    with db.session() as s:
        record = ExportRecord(campaign_id=campaign_id, created_by=actor, approved_only=approved_only, file_count=len(files),
                              zip_sha256=digest, files=[{"asset_id": f.asset_id, "file_name": f.file_name, "sha256": f.sha256}
                                                        for f in files])
        s.add(record)
        s.flush()
        audit(s, actor=actor, action="campaign.exported", entity="campaign", entity_id=campaign_id,
              after={"export_id": record.id, "approved_only": approved_only, "file_count": len(files), "zip_sha256": digest,
                     "asset_ids": [f.asset_id for f in files], "withheld_asset_ids": list(kept_out)})
        export_id = record.id
    return ExportResult(export_id, campaign_name, files, digest, size, kept_out)

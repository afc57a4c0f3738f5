"""What a file says about where it came from, for ``adforge verify``: the invisible watermark (adforge's, and other
tools' known ones), the infotext, the XMP digital source type, the C2PA manifest, and the asset the database holds
for it.

Each reader gives a JSON-ready dict, or None when the file has nothing of that kind. The database is found by the
watermark's asset identifier (it survives re-encoding and metadata stripping) or by the file's sha256 (the
delivered file, unchanged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from storage.database import Database

__all__ = ["find_asset", "image_format", "read_c2pa", "read_foreign_marks", "read_metadata", "read_watermark",
           "sha256_of"]

_DST = re.compile(r"<Iptc4xmpExt:DigitalSourceType>\s*([^<\s]+)\s*<|Iptc4xmpExt:DigitalSourceType=\"([^\"]+)\"")
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def image_format(image: Image.Image) -> str | None:
    return _FORMATS.get(image.format or "")


def read_watermark(image: Image.Image, custom: bytes | None = None,
                   sizes: Sequence[tuple[int, int]] = ()) -> dict[str, Any] | None:
    """adforge's mark in ``image`` (:mod:`storage.watermark`): ``found`` when it is an adforge asset identifier, or
    ``custom`` (this installation's ``text:`` payload) read with confidence. None for a picture too small to carry
    one.

    When the picture as it is holds no mark, two more tries: the tile grid searched (a crop:
    :func:`storage.watermark.search`), and the picture resized back to each of ``sizes`` (the channels' sizes) of
    the same shape (a resized copy)."""
    from storage.watermark import THRESHOLD, read
    from storage.watermark_payload import payload_text

    def kind_of(r) -> str | None:
        if r.is_adforge:
            return "adforge"
        return "custom" if custom and r.confident and r.payload == custom else None

    reading = read(image)
    if reading is None:
        return None
    how = "as it is"
    if kind_of(reading) is None:
        for how_again, again in _other_readings(image, sizes):
            if again is not None and kind_of(again) is not None:
                reading, how = again, how_again
                break
    kind = kind_of(reading)
    return {"found": kind is not None, "kind": kind, "payload": reading.hex, "confidence": round(reading.confidence, 4),
            "threshold": THRESHOLD, "cells": reading.cells, "read": how, "offset": list(reading.offset),
            "candidates": [reading.hex] if kind == "adforge" else [],
            "text": payload_text(reading.payload) if kind == "custom" else None}


def _other_readings(image: Image.Image, sizes: Sequence[tuple[int, int]]):
    from storage.watermark import read, search

    yield "searching the tile grid (a crop)", search(image)
    for w, h in sizes:
        if (w, h) != image.size and abs(w / h - image.width / image.height) < 0.01 * w / h:
            yield f"resized to {w}x{h}", read(image.resize((w, h), Image.LANCZOS))


def read_foreign_marks(image: Image.Image) -> list[dict[str, Any]]:
    """Other tools' known invisible watermarks in ``image`` (:mod:`storage.dwtdct`: Stable Diffusion v1's reference
    scripts, SDXL), each as ``{"name", "bit_accuracy"}``."""
    from storage.dwtdct import foreign_marks

    return [{"name": m.name, "bit_accuracy": round(m.bit_accuracy, 4)} for m in foreign_marks(image)]


def read_metadata(data: bytes) -> dict[str, Any]:
    """The infotext (``parameters`` / EXIF UserComment) and the XMP packet's digital source type, None where absent."""
    from storage.image_metadata import parse_infotext, read_image_metadata

    try:
        infotext, xmp = read_image_metadata(data)
    except Exception:  # a truncated or odd file: no metadata to speak of
        infotext, xmp = None, None
    dst = None
    if xmp:
        m = _DST.search(xmp)
        dst = (m.group(1) or m.group(2)) if m else None
    params = parse_infotext(infotext)[2] if infotext else {}
    identity = re.search(r"<adforge:VariantIdentity>([0-9a-f]+)<", xmp or "")
    return {"infotext": infotext, "seed": params.get("Seed"), "model": params.get("Model"),
            "xmp": xmp is not None, "digital_source_type": dst,
            "variant_identity": identity.group(1) if identity else None}


def read_c2pa(data: bytes, fmt: str | None, trust_pem: str | None) -> dict[str, Any] | None:
    """The C2PA manifest, validated (:mod:`storage.content_credentials`); None when the file carries none."""
    from storage.content_credentials import read_credentials

    report = read_credentials(data, fmt or "", trust_pem)
    if report is None:
        return None
    out = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(vars(report))
    verdict = getattr(report, "verdict", None)
    if verdict is not None:
        out["verdict"] = verdict
    return out


def find_asset(db: Database, *, watermarks: list[str], sha256: str) -> dict[str, Any] | None:
    """The asset row that a watermark identifier (first) or the file's sha256 names, with its variant, run,
    prompt, seed, model and review status; None when neither matches."""
    from sqlalchemy import select

    from storage.review_schema import ReviewState
    from storage.schema import Asset, Campaign, ModelRecord, PromptRecord, Variant
    from storage.variants import with_joins

    query = (with_joins(select(Asset, Variant, PromptRecord.prompt, ModelRecord.name, Campaign.name), asset=True,
                        prompt=True, model=True, campaign=True)
             .outerjoin(ReviewState, ReviewState.variant_id == Variant.id).add_columns(ReviewState.status)
             .order_by(Asset.id.desc()).limit(1))
    with db.session() as s:
        tries = [("watermark", Asset.watermark == w) for w in watermarks] + [("sha256", Asset.sha256 == sha256)]
        for by, where in tries:
            row = s.execute(query.where(where)).first()
            if row is None:
                continue
            a, v, prompt, model, campaign, review = row
            return {"matched_by": by, "asset_id": a.id, "run_id": a.run_id, "variant_id": v.id, "campaign": campaign,
                    "channel": v.channel, "prompt": prompt, "seed": v.seed, "model": model, "status": v.status,
                    "review": review or "pending", "flagged": a.flagged, "released_by": a.released_by,
                    "watermark": a.watermark, "credentials": a.credentials, "store_url": a.store_url,
                    "identical_file": a.sha256 == sha256}
    return None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


"""Flagged assets: which are withheld, and an admin's release of one.

The image filter (flows.image_filter) marks an asset ``flagged``; it stays stored and listed, but its file leaves
through no route (gallery full size, ``/files``, the clean copy, exports) and its thumbnail is blurred, until an admin
releases it. A release is one transaction that sets ``released_by`` / ``released_at`` and appends the audit entry
``asset.released``. Releasing cannot be undone here: the file may already have left once released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.database import Database, audit
from storage.schema import Asset, utcnow

__all__ = ["WITHHELD_MESSAGE", "ReleaseError", "Release", "release_asset", "withheld", "withheld_message"]

WITHHELD_MESSAGE = "asset {id} is flagged by the image filter; an admin must release it before its file is served or exported"


def withheld_message(asset_id: int) -> str:
    return WITHHELD_MESSAGE.format(id=asset_id)


class ReleaseError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Release:
    asset_id: int
    changed: bool  # False: it had been released already (nothing written)
    released_by: str
    released_at: str


def withheld(asset: Any) -> bool:
    """True for a flagged asset no admin has released (an asset row, or any object with those two attributes)."""
    return bool(asset.flagged) and asset.released_at is None


def release_asset(db: Database, asset_id: int, *, actor: str, released_by: str | None = None) -> Release:
    """Release a flagged asset. ``actor`` is who the audit log names (the admin's user name, ``cli:<login>``);
    ``released_by`` the name kept on the asset (default ``actor``)."""
    by = released_by or actor
    with db.session() as s:
        asset = s.get(Asset, asset_id, with_for_update=True)
        if asset is None:
            raise ReleaseError(f"no asset {asset_id}", 404)
        if not asset.flagged:
            raise ReleaseError(f"asset {asset_id} is not flagged: there is nothing to release", 409)
        if asset.released_at is not None:
            return Release(asset_id, False, asset.released_by or "", asset.released_at.isoformat())
        before = {"flagged": True, "released_by": None, "released_at": None}
        asset.released_by, asset.released_at = by[:255], utcnow()
        audit(s, actor=actor, action="asset.released", entity="asset", entity_id=asset_id, run_id=asset.run_id,
              before=before, after={"flagged": True, "released_by": asset.released_by,
                                    "released_at": asset.released_at.isoformat(), "flags": asset.flags})
        return Release(asset_id, True, asset.released_by, asset.released_at.isoformat())

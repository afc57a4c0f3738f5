"""The trust steps of a delivery: the image filter, the invisible watermark and the content credentials.

A run's steps follow from its settings as the run recorded them (``runs.settings``), so every process that delivers
for the run (the flow itself, a device worker, a shard on another machine) applies the same ones without the
settings being handed down to it; each process builds them once per run (a detector's weights load once).

In a delivery (:mod:`flows.delivery`), per image, after the post-processing and the product finish:

1. the watermark goes into the pixels (:class:`Watermark`), outside the product packshot, which stays pixel-exact,
   and before the brand overlay, whose logo and text keep the kit's exact colours;
2. the image filter looks at the final picture, overlay included (:class:`ImageCheck`): a flagged asset is still
   stored and recorded, marked, and kept from export and the API until an admin releases it;
3. each encoding of the file is signed (:class:`Signer`) before the channel's size cap is checked, so the cap
   counts the manifest.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

if TYPE_CHECKING:
    from flows.rendering import RenderJob
    from storage.database import Database

__all__ = ["Finding", "ImageCheck", "Signer", "TrustSteps", "Watermark", "trust_for_run", "trust_from_settings"]


@dataclass(frozen=True)
class Finding:
    """What the image filter decided about one picture: ``details`` is JSON text (detector, concepts, scores)."""

    flagged: bool
    details: str


class ImageCheck(Protocol):
    def check(self, images: list[Image.Image]) -> list[Finding]: ...


class Watermark(Protocol):
    def mark(self, image: Image.Image, job: RenderJob,
             keep: tuple[int, int, int, int] | None) -> tuple[Image.Image, str | None]:
        """The marked picture (pixels inside ``keep``, a product's box, unchanged) and the payload as hex; the
        picture unchanged and None when it is too small to carry the mark."""
        ...


class Signer(Protocol):
    def sign(self, data: bytes, fmt: str, job: RenderJob) -> tuple[bytes, str]:
        """The encoded file with a signed manifest embedded, and the manifest's label."""
        ...


@dataclass(frozen=True)
class TrustSteps:
    image_filter: ImageCheck | None = None
    watermark: Watermark | None = None
    signer: Signer | None = None


def trust_from_settings(settings: Mapping[str, Any]) -> TrustSteps:
    """The steps a run's recorded settings ask for (a missing key: that step's default)."""
    from flows.credentials_step import signer_from_settings
    from flows.image_filter import image_filter_from_settings
    from flows.watermark_step import watermark_from_settings

    return TrustSteps(image_filter=image_filter_from_settings(settings), watermark=watermark_from_settings(settings),
                      signer=signer_from_settings(settings))


_LOCK = threading.Lock()
_BY_RUN: dict[tuple[str, int], TrustSteps] = {}


def trust_for_run(db: Database, run_id: int) -> TrustSteps:
    """The run's steps, built once per process and run."""
    from storage.schema import Run

    key = (str(db.url), run_id)
    with _LOCK:
        steps = _BY_RUN.get(key)
        if steps is None:
            with db.session() as s:
                run = s.get(Run, run_id)
                settings = dict(run.settings or {}) if run is not None else {}
            steps = _BY_RUN[key] = trust_from_settings(settings)
        return steps

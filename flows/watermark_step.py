"""The delivery's invisible watermark (see :mod:`flows.trust`): the run's ``watermark`` setting made into a step.

``on``: each picture carries its asset identifier (:func:`storage.watermark_payload.adforge_payload` of the
variant's identity); ``text:XXXX``: every picture carries the user's text; ``off``: no step. Pictures too small to
carry 64 bits reliably through a JPEG re-encode (:func:`storage.watermark.can_carry`: under 3,840 cells of 4x4
pixels, or under 24 for some bit; e.g. 192x192) are delivered unmarked, their ``assets.watermark`` None, logged
once per size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from flows.trust import Watermark
from storage.watermark_payload import adforge_payload, custom_payload, watermark_setting

if TYPE_CHECKING:
    from flows.rendering import RenderJob

__all__ = ["PayloadWatermark", "watermark_from_settings"]

log = logging.getLogger(__name__)


class PayloadWatermark:
    """Marks pictures with a fixed payload (``custom``) or, when None, each with its asset identifier."""

    def __init__(self, custom: bytes | None = None):
        self.custom = custom
        self._lock = threading.Lock()
        self._too_small: set[tuple[int, int]] = set()

    def payload_for(self, job: RenderJob) -> bytes:
        return self.custom if self.custom is not None else adforge_payload(job.identity)

    def mark(self, image: Image.Image, job: RenderJob, keep: tuple[int, int, int, int] | None) -> tuple[Image.Image, str | None]:
        from storage.watermark import MIN_TOTAL_CELLS, can_carry, embed_checked

        if not can_carry(image.width, image.height):
            with self._lock:
                first = image.size not in self._too_small
                self._too_small.add(image.size)
            if first:
                log.info("%dx%d pictures are delivered without the invisible watermark: too small to carry it "
                         "reliably (%d cells of 4x4 pixels, or 24 of every bit, needed)", image.width, image.height,
                         MIN_TOTAL_CELLS)
            return image, None
        payload = self.payload_for(job)
        marked, sure = embed_checked(image, payload, keep)
        if not sure:  # delivered with the mark, which may still read, but not recorded as proof of anything
            log.warning("variant %s: the invisible watermark does not read back reliably from this picture (its own "
                        "texture drowns it); assets.watermark stays empty", job.variant_id)
            return marked, None
        return marked, payload.hex()


def watermark_from_settings(settings: Mapping[str, Any]) -> Watermark | None:
    """The step the run's ``watermark`` setting asks for ("on" when the run recorded none); None for "off"."""
    value = watermark_setting(str(settings.get("watermark") or "on"))
    if value == "off":
        return None
    return PayloadWatermark(custom_payload(value[5:]) if value.startswith("text:") else None)

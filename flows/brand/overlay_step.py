"""The overlay as a rendering step: a variant's pinned kit and copy drawn on its post-processed picture."""

from __future__ import annotations

import json

from PIL import Image

from flows.brand.compose import Copy, compose
from flows.brand.kit import BrandKit, load_kit
from storage.variants import VariantSpec, parse_overlay

__all__ = ["OverlayStep"]


class OverlayStep:
    """Draws overlays with the kits under ``templates_dir`` (None: the project's templates/), each checked against
    the sha256 its variants were planned with."""

    def __init__(self, templates_dir: str | None = None):
        self.templates_dir = templates_dir

    def kit(self, brand: str, sha256: str) -> BrandKit:
        kit = load_kit(brand, self.templates_dir)
        if kit.sha256 != sha256:
            raise ValueError(f"brand kit '{brand}' ({kit.path}) changed since the variant was planned (content "
                             f"{kit.sha256[:12]}, planned with {sha256[:12]}): plan the brief again to use it")
        return kit

    def apply(self, image: Image.Image, spec: VariantSpec, product_box: tuple[int, int, int, int] | None) -> tuple[Image.Image, str]:
        """The picture with its overlay, and the record of what was drawn where (JSON text)."""
        pin = parse_overlay(spec.overlay)
        if pin is None:
            raise ValueError("the variant has no brand overlay to draw")
        kit = self.kit(pin.brand, pin.kit)
        drawn, record = compose(image, kit, spec.channel, Copy(pin.headline, pin.body, pin.cta), product_box)
        return drawn, json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

"""Reading an overlay back from delivered pixels: where each text's glyphs are (drawn again from the record's line
boxes with the kit's font) and the WCAG contrast between them and the pixels around them, measured on the file."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, features

from flows.brand.contrast import contrast_ratio, luminance_map
from flows.brand.kit import BrandKit


def glyphs(size: tuple[int, int], kit: BrandKit, element: str, record: dict) -> np.ndarray:
    """Ink coverage (0-255) of ``element``'s text as the record says it was drawn."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    font = kit.font(element, record["size"])
    extra = {"direction": record["direction"]} if features.check("raqm") else {}
    for line, (x, y, _, _) in zip(record["lines"], record["line_boxes"]):
        draw.text((x, y), line, font=font, fill=255, anchor="la", **extra)
    return np.asarray(mask)


def measured_contrast(image: Image.Image, kit: BrandKit, element: str, record: dict) -> float:
    """The text's colour (median of its glyphs' inner pixels) against the least distinct 1 % of the pixels in a ring
    around the glyphs (2 px off them, so their anti-aliased edges count as neither), both read from ``image``."""
    coverage = glyphs(image.size, kit, element, record)
    pixels = np.asarray(image.convert("RGB"))
    solid = cv2.erode((coverage > 200).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if solid.sum() < 20:  # thin strokes at a small size: the fully covered pixels themselves
        solid = coverage > 230
    near = cv2.dilate((coverage > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    width = max(2, record["size"] // 8)
    around = cv2.dilate((coverage > 0).astype(np.uint8), np.ones((2 * width + 5, 2 * width + 5), np.uint8)) > 0
    ring = around & ~near
    text = float(np.median(luminance_map(pixels[solid])))
    background = luminance_map(pixels[ring])
    brighter = text >= float(np.median(background))
    worst = float(np.quantile(background, 0.99 if brighter else 0.01))
    return contrast_ratio(text, worst)

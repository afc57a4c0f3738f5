"""Product packshots kept pixel-exact: where the product goes on a canvas, what the engine repaints around it, and the
final paste that puts the packshot's own pixels back.

The product is placed at the *delivered* size (the channel's W x H), because that is where its pixels must be exact:

1. :func:`product_layer` trims the packshot to its opaque extent, fits it into the box its :class:`Placement` gives
   on the W x H canvas, and resizes it once (Lanczos, premultiplied alpha): the layer.
2. :func:`engine_inputs` maps that layer back onto the generation canvas (the inverse of the cover-fit that
   post-processing applies) and gives the engine an init image (product on neutral grey) and a repaint mask
   (everything but the product). The engine pins the product's latents and generates the scene around it.
3. :func:`finish` darkens a soft contact shadow into the delivered image, outside the product only, then pastes the
   layer: where the layer is opaque the pixels are the resized packshot's, byte for byte; its anti-aliased rim is
   blended over the generated scene.

:func:`product_error` measures, on a decoded delivered file, how far the product's opaque pixels are from the layer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["ANCHORS", "Placement", "PlacementError", "ProductLayer", "engine_inputs", "finish", "outline", "packshot_rgba",
           "product_error", "product_layer"]

# Where the product's box sits on the canvas: centred; centred in the left or right third; standing on the bottom
# margin, centred across.
ANCHORS = ("centre", "left_third", "right_third", "bottom")
_ALIASES = {"center": "centre", "middle": "centre", "left": "left_third", "right": "right_third",
            "left third": "left_third", "right third": "right_third", "left-third": "left_third",
            "right-third": "right_third", "bottom": "bottom"}
# The repaint mask's feather at generation size: the seam around the product is generated, not cut.
MASK_BLUR = 2
NEUTRAL = (127, 127, 127)


class PlacementError(ValueError):
    """A placement, packshot or mask that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Placement:
    """``anchor`` (one of :data:`ANCHORS`), ``scale``: the product's box as a share of the anchor's region (the
    product fits inside, keeping its aspect), ``margin``: the share of the canvas's short side kept free at the
    edges, ``shadow``: the contact shadow's opacity (0 = none)."""

    anchor: str = "centre"
    scale: float = 0.6
    margin: float = 0.05
    shadow: float = 0.35

    def __post_init__(self) -> None:
        anchor = _ALIASES.get(self.anchor.strip().lower(), self.anchor.strip().lower().replace(" ", "_"))
        if anchor not in ANCHORS:
            raise PlacementError(f"unknown placement {self.anchor!r} (expected one of {', '.join(ANCHORS)})")
        object.__setattr__(self, "anchor", anchor)
        for name, low, high in (("scale", 0.0, 1.0), ("margin", 0.0, 0.45), ("shadow", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or not (low <= value <= high) or (name == "scale" and value == 0):
                raise PlacementError(f"placement {name} must be a number in {'(' if name == 'scale' else '['}{low:g}, {high:g}], got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def canonical(self) -> str:
        """The placement as recorded: ``anchor:scale:margin:shadow``."""
        return f"{self.anchor}:{self.scale:g}:{self.margin:g}:{self.shadow:g}"

    @classmethod
    def parse(cls, text: str) -> "Placement":
        """``centre``, ``bottom:0.5``, ``left_third:0.7:0.04``, ``centre:0.6:0.05:0`` (anchor, scale, margin, shadow)."""
        parts = [p.strip() for p in text.split(":")]
        defaults = cls()
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise PlacementError(f"placement {text!r}: expected ANCHOR[:SCALE[:MARGIN[:SHADOW]]] with numbers") from None
        if len(numbers) > 3:
            raise PlacementError(f"placement {text!r}: at most three numbers (scale, margin, shadow)")
        values = numbers + [defaults.scale, defaults.margin, defaults.shadow][len(numbers):]
        return cls(parts[0] or defaults.anchor, *values)

    def box(self, canvas: tuple[int, int], product: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the product on a ``canvas`` (W, H) for a product of size ``product``."""
        w, h = canvas
        m = self.margin * min(w, h)
        x0, y0, x1, y1 = m, m, w - m, h - m
        if self.anchor == "left_third":
            x1 = w / 3
        elif self.anchor == "right_third":
            x0 = 2 * w / 3
        rw, rh = max(1.0, x1 - x0), max(1.0, y1 - y0)
        fit = min(self.scale * rw / product[0], self.scale * rh / product[1])
        bw, bh = max(1, round(product[0] * fit)), max(1, round(product[1] * fit))
        left = round(x0 + (rw - bw) / 2)
        top = round(y1 - bh) if self.anchor == "bottom" else round(y0 + (rh - bh) / 2)
        return left, top, bw, bh


@dataclass(frozen=True)
class ProductLayer:
    """The placed product on a transparent canvas of the delivered size, and its box."""

    rgba: Image.Image
    box: tuple[int, int, int, int]

    @property
    def alpha(self) -> np.ndarray:
        return np.asarray(self.rgba.getchannel("A"))

    @property
    def opaque(self) -> np.ndarray:
        """The pixels that must equal the packshot's exactly (fully opaque in the layer)."""
        return self.alpha == 255


def packshot_rgba(image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
    """The product as RGBA: a packshot with transparency as it is, or any image with ``mask`` (white = product)
    as its alpha; trimmed to the product's extent. PlacementError for a mask that covers nothing or everything, or
    a packshot with no opaque pixel."""
    if mask is not None:
        if mask.size != image.size:
            raise PlacementError(f"the mask is {mask.width}x{mask.height}, the image {image.width}x{image.height}")
        alpha = mask.convert("L")
        a = np.asarray(alpha)
        share = float((a >= 128).mean())
        if share == 0.0:
            raise PlacementError("the mask covers nothing (no white pixel: white marks the product)")
        if share == 1.0:
            raise PlacementError("the mask covers everything (no black pixel: nothing would be generated)")
        rgba = image.convert("RGB")
        rgba.putalpha(alpha)
    else:
        rgba = image.convert("RGBA")
        a = np.asarray(rgba.getchannel("A"))
        if not (a > 0).any():
            raise PlacementError("the packshot is fully transparent")
        if (a == 255).all():
            raise PlacementError("the packshot has no transparent pixel: give a PNG with transparency, or a "
                                 "product_mask that marks the product")
    bbox = rgba.getchannel("A").getbbox()
    assert bbox is not None
    return rgba.crop(bbox)


def product_layer(product: Image.Image, canvas: tuple[int, int], placement: Placement) -> ProductLayer:
    """``product`` (RGBA from :func:`packshot_rgba`) resized into its box on a transparent ``canvas`` (W, H)."""
    left, top, bw, bh = placement.box(canvas, product.size)
    # Pillow resizes RGBA with premultiplied alpha, so transparent pixels' colours do not bleed into the rim.
    placed = product if product.size == (bw, bh) else product.resize((bw, bh), Image.Resampling.LANCZOS)
    layer = Image.new("RGBA", canvas, (0, 0, 0, 0))
    layer.paste(placed, (left, top))
    return ProductLayer(layer, (left, top, bw, bh))


def _cover_geometry(gen: tuple[int, int], out: tuple[int, int]) -> tuple[int, int, int, int]:
    """(resized width, height, crop left, top) of a cover-fit from ``gen`` to ``out`` (engine.image_ops.cover_fit)."""
    gw, gh = gen
    w, h = out
    scale = max(w / gw, h / gh)
    rw, rh = max(w, round(gw * scale)), max(h, round(gh * scale))
    return rw, rh, (rw - w) // 2, (rh - h) // 2


def engine_inputs(layer: ProductLayer, gen: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """(init image, repaint mask) at the generation size ``gen`` (W, H) for ``layer``: the product where
    post-processing's cover-fit will bring it back to the layer's place, on neutral grey; the mask white
    everywhere but the product (the engine feathers it by :data:`MASK_BLUR`)."""
    out = layer.rgba.size
    rw, rh, left, top = _cover_geometry(gen, out)
    covered = Image.new("RGBA", (rw, rh), (0, 0, 0, 0))
    covered.paste(layer.rgba, (left, top))
    at_gen = covered if (rw, rh) == gen else covered.resize(gen, Image.Resampling.LANCZOS)
    init = Image.new("RGB", gen, NEUTRAL)
    init.paste(at_gen, (0, 0), at_gen)
    keep = np.asarray(at_gen.getchannel("A")) >= 128
    mask = Image.fromarray(np.where(keep, 0, 255).astype(np.uint8), "L")
    return init, mask


def finish(image: Image.Image, layer: ProductLayer, shadow: float) -> Image.Image:
    """The delivered image: ``image`` (the rendered scene at the delivered size) with a soft contact shadow outside
    the product, then the layer pasted over it."""
    if image.size != layer.rgba.size:
        raise PlacementError(f"the image is {image.width}x{image.height}, the product layer {layer.rgba.width}x{layer.rgba.height}")
    base = image.convert("RGB")
    alpha = layer.rgba.getchannel("A")
    if shadow > 0:
        _, top, _, bh = layer.box
        radius = max(1.0, 0.04 * bh)
        # The product's silhouette, nudged down and blurred: darkest just under and around it, fading out.
        dropped = Image.new("L", alpha.size, 0)
        dropped.paste(alpha, (0, max(1, round(0.015 * bh))))
        soft = np.asarray(dropped.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
        outside = 1.0 - np.asarray(alpha, dtype=np.float32) / 255.0
        dark = 1.0 - shadow * soft * outside
        arr = np.asarray(base, dtype=np.float32) * dark[..., None]
        base = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    rgb = layer.rgba.convert("RGB")
    a = np.asarray(alpha, dtype=np.uint16)[..., None]
    blended = (np.asarray(rgb, dtype=np.uint16) * a + np.asarray(base, dtype=np.uint16) * (255 - a) + 127) // 255
    # Opaque pixels are the layer's exactly (the integer blend above gives that too; this says it outright).
    out = np.where(a == 255, np.asarray(rgb), blended.astype(np.uint8))
    return Image.fromarray(out.astype(np.uint8), "RGB")


def outline(layer: ProductLayer, tolerance: float = 1.0) -> str:
    """The product's outline as SVG path data in delivered-image pixels (outer edges of its opaque region, each
    simplified to within ``tolerance`` px), for the gallery to draw over the image."""
    import cv2

    mask = (layer.alpha >= 128).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = []
    for contour in contours:
        points = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2)
        if len(points) >= 3:
            parts.append("M" + " L".join(f"{x} {y}" for x, y in points) + " Z")
    return " ".join(parts)


def product_error(delivered: Image.Image, layer: ProductLayer) -> tuple[int, float]:
    """(largest, mean) absolute difference over the product's opaque pixels between a decoded delivered file and
    the layer: (0, 0.0) for a lossless file that kept the product."""
    opaque = layer.opaque
    if not opaque.any():
        return 0, 0.0
    got = np.asarray(delivered.convert("RGB"), dtype=np.int16)[opaque]
    want = np.asarray(layer.rgba.convert("RGB"), dtype=np.int16)[opaque]
    diff = np.abs(got - want)
    return int(diff.max()), float(diff.mean())

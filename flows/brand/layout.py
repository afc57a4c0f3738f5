"""A kit's layout in pixels for one canvas: the safe zone, the logo's box in its corner, and each text's box, moved
off a placed product.

A text box that overlaps the product (with a gap of 2 % of the short side) is cut to the largest part of it that
does not: left of, right of, above or below the product. A logo over the product is refused, since its place is
the brand's rule (a layout may list corners in order of preference: the first the product leaves free is used); so
is a text box with nothing usable left.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.brand.kit import Layout

__all__ = ["Box", "OverlayProblem", "Placed", "logo_box", "logo_corner", "logo_in", "place"]

Box = tuple[int, int, int, int]  # left, top, width, height
PRODUCT_GAP = 0.02
MIN_SIDE = 8  # px: a cut text box narrower or lower than this is no box


class OverlayProblem(ValueError):
    """An overlay that cannot be laid out or drawn; ``element`` is headline / body / cta / logo."""

    def __init__(self, element: str, message: str):
        self.element = element
        super().__init__(message)


@dataclass(frozen=True)
class Placed:
    safe: Box
    logo_areas: tuple[tuple[str, Box], ...]  # (corner, where the logo may go there), in the layout's order
    texts: dict[str, Box]
    moved: tuple[str, ...] = ()  # texts whose box was cut to keep off the product

    @property
    def logo_area(self) -> Box | None:
        return self.logo_areas[0][1] if self.logo_areas else None


def _intersects(a: Box, b: Box) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _avoid(box: Box, obstacle: Box) -> Box | None:
    x, y, w, h = box
    ox, oy, ow, oh = obstacle
    cuts = [
        (x, y, ox - x, h),  # left of it
        (ox + ow, y, x + w - (ox + ow), h),  # right of it
        (x, y, w, oy - y),  # above it
        (x, oy + oh, w, y + h - (oy + oh)),  # below it
    ]
    usable = [c for c in cuts if c[2] >= MIN_SIDE and c[3] >= MIN_SIDE]
    return max(usable, key=lambda c: (c[2] * c[3], -cuts.index(c))) if usable else None


def place(layout: Layout, size: tuple[int, int], product: Box | None = None) -> Placed:
    sl, st, sw, sh = layout.safe_box(size)
    logo_areas: list[tuple[str, Box]] = []
    if layout.logo is not None:
        aw, ah = max(1, round(layout.logo.width * sw)), max(1, round(layout.logo.max_height * sh))
        for corner in layout.logo.corners:
            left = sl if corner.endswith("left") else sl + sw - aw if corner.endswith("right") else sl + (sw - aw) // 2
            top = st if corner.startswith("top") else st + sh - ah
            logo_areas.append((corner, (left, top, aw, ah)))
    gap = round(PRODUCT_GAP * min(size))
    obstacle = None if product is None else (product[0] - gap, product[1] - gap, product[2] + 2 * gap, product[3] + 2 * gap)
    texts: dict[str, Box] = {}
    moved: list[str] = []
    for element, spec in layout.texts.items():
        x, y, w, h = spec.box
        box = (sl + round(x * sw), st + round(y * sh), max(1, round(w * sw)), max(1, round(h * sh)))
        if obstacle is not None and _intersects(box, obstacle):
            cut = _avoid(box, obstacle)
            if cut is None:
                raise OverlayProblem(element, f"the {layout.name} layout's {element} box {box} has no room beside the "
                                           f"product at {product}")
            box = cut
            moved.append(element)
        texts[element] = box
    return Placed((sl, st, sw, sh), tuple(logo_areas), texts, tuple(moved))


def logo_box(area: Box, corner: str, logo_size: tuple[int, int]) -> Box:
    """The logo's box: ``logo_size`` (its natural size) scaled to fit ``area``, in ``corner``."""
    ax, ay, aw, ah = area
    nw, nh = logo_size
    scale = min(aw / nw, ah / nh)
    w, h = max(1, round(nw * scale)), max(1, round(nh * scale))
    left = ax if corner.endswith("left") else ax + aw - w if corner.endswith("right") else ax + (aw - w) // 2
    top = ay if corner.startswith("top") else ay + ah - h
    return left, top, w, h


def logo_in(area: Box, corner: str, logo_size: tuple[int, int], inset: int = 0) -> Box:
    """The logo's box in ``area``, ``inset`` px inside it (room for a plate around it)."""
    ax, ay, aw, ah = area
    return logo_box((ax + inset, ay + inset, max(1, aw - 2 * inset), max(1, ah - 2 * inset)), corner, logo_size)


def logo_corner(placed: Placed, logo_sizes: list[tuple[int, int]], product: Box | None, inset: int = 0) -> tuple[str, Box] | None:
    """(corner, area) of the first corner of the layout's where the logo, every variant of it and the room kept
    around it, stays off the product; OverlayProblem where none does. None for a layout without a logo."""
    if not placed.logo_areas:
        return None
    for corner, area in placed.logo_areas:
        boxes = [logo_in(area, corner, size, inset) for size in logo_sizes]
        rooms = [(b[0] - inset, b[1] - inset, b[2] + 2 * inset, b[3] + 2 * inset) for b in boxes]
        if product is None or not any(_intersects(room, product) for room in rooms):
            return corner, area
    tried = ", ".join(c for c, _ in placed.logo_areas)
    raise OverlayProblem("logo", f"the logo would cover the product at {product} in every corner the layout allows "
                              f"({tried}); move the product (the row's placement) or give the layout's logo another corner")

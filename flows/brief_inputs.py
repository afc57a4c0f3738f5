"""The brief columns that hand images to the engine: a product packshot (``product_image``, ``product_mask``,
``placement``) and a ControlNet layout (``control_image``, ``control_type``, ``control_strength``, ``control_start``,
``control_end``). Only the cells are checked here (text, numbers, names); the files are read when the brief is planned
(:mod:`flows.row_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.safe_text import quoted

__all__ = ["CONTROL_COLUMNS", "CONTROL_TYPES", "PRODUCT_COLUMNS", "ControlCell", "check_control", "check_product"]

PRODUCT_COLUMNS: tuple[str, ...] = ("product_image", "product_mask", "placement")
CONTROL_COLUMNS: tuple[str, ...] = ("control_image", "control_type", "control_strength", "control_start", "control_end")
# The control types a brief may name: edges taken from the image (canny, softedge), or the image used as it is.
CONTROL_TYPES: tuple[str, ...] = ("canny", "softedge", "lineart", "scribble", "depth", "pose")


@dataclass(frozen=True)
class ControlCell:
    """A row's ControlNet layout: the image as written in the brief, its type, weight and step window."""

    image: str
    type: str
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


def check_product(values: dict[str, str], bad) -> tuple[str, str, str]:
    """(product_image, product_mask, canonical placement) of a row; problems go to ``bad``."""
    from engine.packshot import Placement, PlacementError

    image, mask, text = (values.get(c, "") for c in PRODUCT_COLUMNS)
    if mask and not image:
        bad("product_mask", "a product_mask needs a product_image")
    placement = ""
    if text:
        if not image:
            bad("placement", "a placement needs a product_image to place")
        else:
            try:
                placement = Placement.parse(text).canonical
            except PlacementError as exc:
                bad("placement", str(exc))
    return image, mask, placement


def _number(values: dict[str, str], column: str, default: float, low: float, high: float, bad) -> float:
    text = values.get(column, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        bad(column, f"{quoted(text)} is not a number")
        return default
    if not low <= value <= high:
        bad(column, f"{quoted(text)} must be between {low:g} and {high:g}")
        return default
    return value


def check_control(values: dict[str, str], bad) -> ControlCell | None:
    image = values.get("control_image", "")
    kind = values.get("control_type", "").strip().lower()
    strength = _number(values, "control_strength", 1.0, 0.0, 2.0, bad)
    start = _number(values, "control_start", 0.0, 0.0, 1.0, bad)
    end = _number(values, "control_end", 1.0, 0.0, 1.0, bad)
    if not image:
        for column in CONTROL_COLUMNS[1:]:
            if values.get(column, ""):
                bad(column, "needs a control_image")
                break
        return None
    if not kind:
        bad("control_type", f"a control_image needs its control_type ({', '.join(CONTROL_TYPES)})")
        return None
    if kind not in CONTROL_TYPES:
        bad("control_type", f"unknown control type {quoted(kind)} (expected one of {', '.join(CONTROL_TYPES)})")
        return None
    if start >= end:
        bad("control_end", f"control_end ({end:g}) must be after control_start ({start:g})")
        return None
    return ControlCell(image, kind, strength, start, end)

"""Drawing a brand overlay on a delivered picture: the logo in its corner, the headline, the body and the call to
action in their boxes, each text in the colour that reads against what is behind it.

For each text the style's colour is tried first, then its alternate; the first whose WCAG contrast against the
pixels under and around its glyphs, the worst of them (:func:`flows.brand.contrast.ratio_against`), reaches the kit's floor, with a 10 % margin so
the encoded file still measures above it, is used. When neither does, a panel in the style's scrim colour goes
behind the text, at the lowest opacity (in steps of 5 %) that reaches it (:func:`_lightest`). The call to action sits on a button in its
style's background colour, whose contrast the kit checked when it was read. The logo variant (light or dark) is the
one that contrasts more with the picture under it.

:func:`fit_overlay` does the measuring without pixels, so planning refuses a text that cannot fit before anything
renders; :func:`compose` draws. The same inputs give the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from flows.brand.contrast import RGB, contrast_ratio, luminance, luminance_map, mix, mixed_luminance, ratio_against, ring
from flows.brand.kit import TEXT_ELEMENTS, BrandKit, TextStyle
from flows.brand.layout import Box, OverlayProblem, Placed, logo_corner, logo_in, place
from flows.brand.text import FitError, FittedText, draw_text, fit_text, layout_engine, side_of, text_mask

__all__ = ["Copy", "OverlayProblem", "compose", "fit_overlay", "MARGIN"]

MARGIN = 1.1  # contrast chosen at the floor times this, so JPEG / WebP encoding leaves it above the floor


@dataclass(frozen=True)
class Copy:
    headline: str = ""
    body: str = ""
    cta: str = ""

    def get(self, element: str) -> str:
        return getattr(self, element)


def _hex(c: RGB) -> str:
    return "#%02X%02X%02X" % c


def _sizes(kit: BrandKit, layout_name: str, element: str) -> tuple[int, int]:
    spec = kit.layouts[layout_name].texts[element]
    return spec.size or kit.styles[element].size


def _fit(kit: BrandKit, layout_name: str, element: str, text: str, box: Box) -> tuple[FittedText, int]:
    """The fitted text and the padding (px) around it inside ``box`` (the button's, for the call to action)."""
    style = kit.styles[element]
    sizes = _sizes(kit, layout_name, element)

    def attempt(pad_size: int) -> tuple[FittedText, int]:
        # A button's padding; plain text keeps the reach of its contrast ring (at the largest size) from the edges.
        pad = round(style.padding * pad_size) if style.background is not None else sizes[1] // 8 + 4
        inner = (box[2] - 2 * pad, box[3] - 2 * pad)
        if inner[0] < 1 or inner[1] < 1:
            raise FitError(f"leaves no room inside a {box[2]}x{box[3]} px box with its padding")
        return fit_text(text, str(style.font), inner, sizes, line_height=style.line_height, max_lines=style.max_lines,
                        font_for=lambda s: kit.font(element, s)), pad

    return _fit_cached(kit, layout_name, element, text, box, sizes, attempt)


_FITS: dict[tuple, tuple[FittedText, int] | FitError] = {}


def _fit_cached(kit: BrandKit, layout_name: str, element: str, text: str, box: Box, sizes: tuple[int, int],
                attempt) -> tuple[FittedText, int]:
    """Fitting is pure in its inputs and a row's variants repeat them: planning and every variant share one fit."""
    key = (kit.sha256, layout_name, element, text, tuple(box), sizes)
    found = _FITS.get(key)
    if found is None:
        try:
            found = attempt(sizes[1])
        except FitError as exc:
            found = exc
            if kit.styles[element].background is not None:  # a button: try the padding of the smallest size
                try:
                    found = attempt(sizes[0])
                except FitError as again:
                    found = again
        if len(_FITS) > 4096:
            _FITS.clear()
        _FITS[key] = found
    if isinstance(found, FitError):
        raise found
    return found


def fit_overlay(kit: BrandKit, channel: str, size: tuple[int, int], copy: Copy,
                product: Box | None = None) -> tuple[Placed, dict[str, tuple[FittedText, int]]]:
    """Where everything goes on a ``size`` canvas and each text fitted (OverlayProblem naming the element if not)."""
    layout = kit.layout_for(channel)
    placed = place(layout, size, product)
    if layout.logo is not None:
        logo_corner(placed, [kit.logo_size(v) for v in kit.logos], product, _plate_inset(kit, placed))
    fitted: dict[str, tuple[FittedText, int]] = {}
    for element in TEXT_ELEMENTS:
        text = copy.get(element).strip()
        if not text:
            continue
        box = placed.texts.get(element)
        if box is None:
            continue  # this channel's layout leaves the element out (a leaderboard has no room for a body)
        try:
            fitted[element] = _fit(kit, layout.name, element, text, box)
        except FitError as exc:
            why = " (its box was cut to keep clear of the product: move the product, or give the text room)" \
                if element in placed.moved else ""
            raise OverlayProblem(element, f"{element} {text[:40]!r} in the '{layout.name}' layout: {exc}{why}") from None
    return placed, fitted


def _origin(fitted: FittedText, box: Box, placed: Placed, pad: int, block: tuple[int, int]) -> tuple[int, int]:
    """Top-left of a text block of ``block`` (w, h) in ``box``: at the box's top when the box is in the upper half of
    the safe zone, at its bottom otherwise (texts keep to the edges, off the picture's middle)."""
    x, y, w, h = box
    safe_mid = placed.safe[1] + placed.safe[3] / 2
    top = y + pad if y + h / 2 <= safe_mid else y + h - pad - block[1]
    return x + pad, top


def _block_box(lines: list[tuple[int, int, int, int]], pad: int) -> Box:
    left = min(b[0] for b in lines) - pad
    top = min(b[1] for b in lines) - pad
    right = max(b[0] + b[2] for b in lines) + pad
    bottom = max(b[1] + b[3] for b in lines) + pad
    return left, top, right - left, bottom - top


def _union(a: Box, b: Box) -> Box:
    l, t = min(a[0], b[0]), min(a[1], b[1])
    return l, t, max(a[0] + a[2], b[0] + b[2]) - l, max(a[1] + a[3], b[1] + b[3]) - t


def _clip(box: Box, to: Box) -> Box:
    l, t = max(box[0], to[0]), max(box[1], to[1])
    r, b = min(box[0] + box[2], to[0] + to[2]), min(box[1] + box[3], to[1] + to[3])
    return l, t, max(0, r - l), max(0, b - t)


def _around(mask: np.ndarray, size: int) -> np.ndarray:
    """The pixels under and around the glyphs of ``mask`` (bool): what a reader sees the text against."""
    return (mask > 127) | ring(mask > 0, max(2, size // 8) + 2)


def _plate_inset(kit: BrandKit, placed: Placed) -> int:
    """Room kept around the logo for its plate (none without one): an eighth of the logo area's height."""
    if kit.logo_plate is None or placed.logo_area is None:
        return 0
    return max(2, placed.logo_area[3] // 8)


_LOGO_LUMINANCE: dict[int, tuple[Image.Image, float]] = {}


def _logo_luminance(logo: Image.Image) -> float:
    """The logo's typical luminance: the median of its opaque pixels (once per rendered logo: they are cached)."""
    found = _LOGO_LUMINANCE.get(id(logo))
    if found is not None and found[0] is logo:
        return found[1]
    alpha = np.asarray(logo.getchannel("A")) > 127
    ink = np.asarray(logo.convert("RGB"))[alpha]
    value = float(np.median(luminance_map(ink))) if ink.size else 0.0
    if len(_LOGO_LUMINANCE) > 256:
        _LOGO_LUMINANCE.clear()
    _LOGO_LUMINANCE[id(logo)] = (logo, value)  # the image is kept, so its id cannot name another meanwhile
    return value


def _logo_ratio(logo: Image.Image, under: np.ndarray) -> float:
    return ratio_against(_logo_luminance(logo), luminance_map(under.reshape(-1, 3)))


def _paste_logo(canvas: Image.Image, kit: BrandKit, placed: Placed, product: Box | None) -> dict:
    base = np.asarray(canvas)
    options: list[tuple[float, str, Box, Image.Image]] = []
    inset = _plate_inset(kit, placed)
    chosen = logo_corner(placed, [kit.logo_size(v) for v in kit.logos], product, inset)
    assert chosen is not None
    corner, area = chosen
    for variant in sorted(kit.logos):
        box = logo_in(area, corner, kit.logo_size(variant), inset)
        logo = kit.logo(variant, box[2], box[3])
        box = (box[0], box[1], logo.width, logo.height)
        options.append((_logo_ratio(logo, base[box[1]:box[1] + box[3], box[0]:box[0] + box[2]]), variant, box, logo))
    ratio, variant, box, logo = max(options, key=lambda o: o[0])
    record: dict = {"variant": variant, "corner": corner, "box": list(box), "contrast": round(ratio, 2),
                    "min_contrast": kit.logo_contrast}
    if ratio < kit.logo_contrast * MARGIN and kit.logo_plate is not None:
        # A plate behind the logo that contrasts most with the plate's colour, at the lowest opacity that reads.
        plate = (box[0] - inset, box[1] - inset, box[2] + 2 * inset, box[3] + 2 * inset)
        l, t, w, h = plate
        region = base[t:t + h, l:l + w]
        flat = np.full((1, 1, 3), kit.logo_plate, np.uint8)
        ratio, variant, box, logo = max(options, key=lambda o: _logo_ratio(o[3], flat))
        inner = (box[1] - t, box[0] - l)
        under_logo = region[inner[0]:inner[0] + box[3], inner[1]:inner[1] + box[2]]
        ink_l = _logo_luminance(logo)
        step, ratio = _lightest(lambda k: ratio_against(ink_l, mixed_luminance(under_logo.reshape(-1, 3), kit.logo_plate, k)),  # type: ignore[arg-type]
                                kit.logo_contrast * MARGIN)
        shape = Image.new("L", (w, h), 0)
        ImageDraw.Draw(shape).rounded_rectangle((0, 0, w - 1, h - 1), radius=min(w, h) * 0.2, fill=255)
        canvas.paste(Image.fromarray(mix(region, kit.logo_plate, step)), (l, t), shape)
        record.update(variant=variant, box=list(box), contrast=round(ratio, 2), plate=_hex(kit.logo_plate),
                      plate_opacity=step / 20, panel=list(plate))
    canvas.paste(logo, box[:2], logo)
    return record


def _draw_text(canvas: Image.Image, kit: BrandKit, element: str, style: TextStyle, fitted: FittedText, pad: int,
               box: Box, align: str, placed: Placed) -> dict:
    font = kit.font(element, fitted.size)
    ascent, descent = font.getmetrics()
    block = (fitted.width, fitted.height)
    if style.background is not None:  # the call to action: a button
        bw, bh = block[0] + 2 * pad, block[1] + 2 * pad
        x, y, w, h = box
        side = side_of(align, fitted.direction)
        bx = x if side == "left" else x + w - bw if side == "right" else x + (w - bw) // 2
        safe_mid = placed.safe[1] + placed.safe[3] / 2
        by = y if y + h / 2 <= safe_mid else y + h - bh
        draw = ImageDraw.Draw(canvas)
        draw.rounded_rectangle((bx, by, bx + bw - 1, by + bh - 1), radius=min(bw, bh) * 0.3, fill=style.background)
        drawn = draw_text(draw, fitted, font, (bx + pad, by + pad), block[0], "centre", style.colour)
        return {"text": fitted.text, "box": list(box), "button": [bx, by, bw, bh], "size": fitted.size,
                "line_boxes": [list(b) for b in drawn], "direction": fitted.direction,
                "lines": list(fitted.lines), "colour": _hex(style.colour), "choice": "button",
                "background": _hex(style.background), "contrast": round(contrast_ratio(style.colour, style.background), 2)}
    # Plain text sits inset by ``pad`` (the reach of the ring its contrast is judged on), so glyphs, ring and any
    # scrim stay inside its box, and the box inside the safe zone.
    inner = (box[0] + pad, box[1] + pad, box[2] - 2 * pad, box[3] - 2 * pad)
    origin = _origin(fitted, inner, placed, 0, block)
    local = (origin[0] - box[0], origin[1] - box[1])
    mask = np.asarray(text_mask(box[2:], fitted, font, local, inner[2], align))
    pixels = np.asarray(canvas.crop((box[0], box[1], box[0] + box[2], box[1] + box[3])))
    around = _around(mask, fitted.size)
    behind = luminance_map(pixels[around])
    target = kit.min_contrast * MARGIN
    line_boxes = _line_boxes(fitted, origin, inner[2], align, ascent + descent)
    record: dict = {"text": fitted.text, "box": list(box), "size": fitted.size, "lines": list(fitted.lines),
                    "direction": fitted.direction, "line_boxes": [list(b) for b in line_boxes]}
    for choice, colour in (("colour", style.colour), ("alternate", style.alternate)):
        if colour is None:
            continue
        ratio = ratio_against(luminance(colour), behind)
        if ratio >= target:
            draw_text(ImageDraw.Draw(canvas), fitted, font, origin, inner[2], align, colour)
            return {**record, "colour": _hex(colour), "choice": choice, "contrast": round(ratio, 2)}
    if style.scrim is None:
        raise OverlayProblem(element, f"{element}: neither colour reaches contrast {kit.min_contrast:g}:1 against the "
                                      "picture here, and its style has no scrim")
    # The panel covers the padded text block and every pixel the contrast is judged on, within the box.
    ys, xs = np.nonzero(around)
    seen_box = (box[0] + int(xs.min()), box[1] + int(ys.min()), int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1)
    panel = _clip(_union(_block_box(line_boxes, round(style.padding * fitted.size)), seen_box), box)
    l, t, w, h = panel
    under = pixels[t - box[1]:t - box[1] + h, l - box[0]:l - box[0] + w]
    seen = under[around[t - box[1]:t - box[1] + h, l - box[0]:l - box[0] + w]]
    colour = style.colour
    text_luminance = luminance(colour)
    step, ratio = _lightest(lambda k: ratio_against(text_luminance, mixed_luminance(seen, style.scrim, k)),  # type: ignore[arg-type]
                            target)
    opacity = step / 20
    canvas.paste(Image.fromarray(mix(under, style.scrim, step)), (l, t))
    draw_text(ImageDraw.Draw(canvas), fitted, font, origin, inner[2], align, colour)
    return {**record, "colour": _hex(colour), "choice": "scrim", "scrim": _hex(style.scrim),
            "scrim_opacity": opacity, "panel": list(panel), "contrast": round(ratio, 2)}


LIGHTEST, DARKEST = 7, 20  # scrim and plate opacities, in twentieths: 35 % .. 100 %


def _lightest(ratio_at, target: float) -> tuple[int, float]:
    """(step, ratio): a scrim or plate opacity step that reaches ``target`` while the next lighter one does not,
    found by bisection, so a handful of measurements instead of one per step. Covering the picture more never lowers
    a text's contrast against a black or white panel (every channel moves one way), so there it is the lightest
    that reads; with a coloured panel it is one that reads. The darkest step when none does."""
    ratio = ratio_at(LIGHTEST)
    if ratio >= target:
        return LIGHTEST, ratio
    lo, hi, hi_ratio = LIGHTEST, DARKEST, ratio_at(DARKEST)
    if hi_ratio < target:
        return DARKEST, hi_ratio
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ratio = ratio_at(mid)
        if ratio >= target:
            hi, hi_ratio = mid, ratio
        else:
            lo = mid
    return hi, hi_ratio


def _line_boxes(fitted: FittedText, origin: tuple[int, int], box_width: int, align: str, height: int) -> list[Box]:
    side = side_of(align, fitted.direction)
    out = []
    for i, w in enumerate(fitted.widths):
        x = origin[0] if side == "left" else origin[0] + box_width - w if side == "right" else origin[0] + (box_width - w) // 2
        out.append((x, origin[1] + i * fitted.pitch, w, height))
    return out


def compose(image: Image.Image, kit: BrandKit, channel: str, copy: Copy, product: Box | None = None) -> tuple[Image.Image, dict]:
    """``image`` with the overlay, and the record of what went where (JSON-ready)."""
    placed, fitted = fit_overlay(kit, channel, image.size, copy, product)
    layout = kit.layout_for(channel)
    canvas = image.convert("RGB")
    record: dict = {"brand": kit.key, "kit": kit.sha256, "layout": layout.name, "layout_engine": layout_engine(),
                    "size": list(image.size), "safe": list(placed.safe), "min_contrast": kit.min_contrast}
    if placed.moved:
        record["moved_for_product"] = list(placed.moved)
    if layout.logo is not None:
        record["logo"] = _paste_logo(canvas, kit, placed, product)
    for element in TEXT_ELEMENTS:
        if element not in fitted:
            continue
        text, pad = fitted[element]
        align = layout.texts[element].align or kit.styles[element].align
        record[element] = _draw_text(canvas, kit, element, kit.styles[element], text, pad, placed.texts[element], align, placed)
    return canvas, record

"""Fitting a text into a box: line breaks, the largest font size in the style's range that fits, and drawing it.

Widths are measured with the font's own shaping (Pillow's Raqm layout where it is installed: ligatures, kerning,
Arabic joining, right-to-left runs), so what fits here fits when drawn. Lines break at spaces; a text in a script
written without spaces (Chinese, Japanese, Thai) or a single word wider than the box at the smallest size breaks
between characters only where the script allows it (CJK), else the text does not fit. A newline in the text is a
forced break.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, features

__all__ = ["FitError", "FittedText", "check_copy", "direction_of", "draw_text", "fit_text", "layout_engine", "side_of",
           "text_mask"]

_SPACE = re.compile(r"[ \t\u00a0\u3000]+")
# Bidirectional controls, other controls: a headline must not reorder itself or carry invisible instructions.
_FORBIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_COPY_CHARS = 400


class FitError(ValueError):
    """The text cannot be drawn in the box within the style's sizes and lines; the message says why."""


@dataclass(frozen=True)
class FittedText:
    text: str
    size: int  # font size in px
    lines: tuple[str, ...]
    pitch: int  # px from one line's top to the next
    widths: tuple[int, ...]  # each line's advance width in px
    height: int  # from the first line's top to the last line's descent
    direction: str  # "ltr" | "rtl"

    @property
    def width(self) -> int:
        return max(self.widths, default=0)


def layout_engine() -> str:
    return "raqm" if features.check("raqm") else "basic"


def direction_of(text: str) -> str:
    """``rtl`` when the first strong character is right-to-left (Hebrew, Arabic), else ``ltr``."""
    for ch in text:
        kind = unicodedata.bidirectional(ch)
        if kind in ("R", "AL"):
            return "rtl"
        if kind == "L":
            return "ltr"
    return "ltr"


def check_copy(text: str) -> str | None:
    """Why ``text`` cannot be an overlay's copy, or None."""
    if len(text) > MAX_COPY_CHARS:
        return f"{len(text)} characters; an overlay text is at most {MAX_COPY_CHARS}"
    m = _FORBIDDEN.search(text)
    if m:
        return f"holds the control character U+{ord(m.group()):04X}, which an overlay does not draw"
    return None


def _breakable(ch: str) -> bool:
    """A character after which a line may break without a space (CJK ideographs, kana, Hangul, fullwidth forms)."""
    o = ord(ch)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF
            or 0x20000 <= o <= 0x2FA1F)


def _tokens(paragraph: str) -> list[str]:
    """Words; in a word with CJK characters each such character is a token of its own. A token starting with
    NUL attaches to the one before it without a space (:func:`_join`)."""
    out: list[str] = []
    for word in _SPACE.split(paragraph.strip()):
        if not word:
            continue
        pieces: list[str] = []
        buf = ""
        for c in word:
            if _breakable(c):
                if buf:
                    pieces.append(buf)
                    buf = ""
                pieces.append(c)
            else:
                buf += c
        if buf:
            pieces.append(buf)
        out.append(pieces[0])
        out.extend("\x00" + p for p in pieces[1:])
    return out


def _join(tokens: list[str]) -> str:
    text = ""
    for t in tokens:
        if t.startswith("\x00"):
            text += t[1:]
        else:
            text += (" " if text else "") + t
    return text


def _wrap(paragraph: str, font: ImageFont.FreeTypeFont, width: int, direction: str) -> list[str] | None:
    """Greedy line breaking of one paragraph; None when a token alone is wider than ``width``."""
    lines: list[str] = []
    current: list[str] = []
    for token in _tokens(paragraph):
        trial = _join(current + [token])
        if _length(font, trial, direction) <= width:
            current.append(token)
            continue
        if not current:
            return None
        lines.append(_join(current))
        current = [token]
        if _length(font, _join(current), direction) > width:
            return None
    if current:
        lines.append(_join(current))
    return lines


def _length(font: ImageFont.FreeTypeFont, text: str, direction: str) -> float:
    if layout_engine() == "raqm":
        return font.getlength(text, direction=direction)
    return font.getlength(text)


def _layout_at(text: str, font: ImageFont.FreeTypeFont, size: int, width: int, line_height: float,
               direction: str) -> tuple[list[str], int, int] | None:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        wrapped = _wrap(paragraph, font, width, direction)
        if wrapped is None:
            return None
        lines.extend(wrapped or [""])
    ascent, descent = font.getmetrics()
    pitch = max(1, round(size * line_height))
    height = pitch * (len(lines) - 1) + ascent + descent
    return lines, pitch, height


def fit_text(text: str, font_path: str, box: tuple[int, int], sizes: tuple[int, int], *, line_height: float,
             max_lines: int, font_for=None) -> FittedText:
    """The largest size in ``sizes`` at which ``text`` fits ``box`` (width, height) in at most ``max_lines``.
    ``font_for(size)`` returns the font (cached by the caller); by default the file is opened per size."""
    width, height = box
    direction = direction_of(text)
    get = font_for or (lambda s: ImageFont.truetype(font_path, s))
    text = text.strip()

    def attempt(size: int) -> FittedText | None:
        font = get(size)
        laid = _layout_at(text, font, size, width, line_height, direction)
        if laid is None:
            return None
        lines, pitch, total = laid
        if len(lines) > max_lines or total > height:
            return None
        widths = tuple(round(_length(font, line, direction)) for line in lines)
        return FittedText(text, size, tuple(lines), pitch, widths, total, direction)

    low, high = sizes
    best = attempt(low)
    if best is None:
        font = get(low)
        laid = _layout_at(text, font, low, width, line_height, direction)
        why = ("a word is wider than the box" if laid is None else
               f"{len(laid[0])} lines of {low} px, at most {max_lines} fit" if len(laid[0]) > max_lines else
               f"{laid[2]} px tall, the box is {height} px")
        raise FitError(f"does not fit a {width}x{height} px box at the smallest size {low} px ({why})")
    # Fitting is monotone in the size (a larger font never takes fewer lines), so bisect.
    lo, hi = low, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = attempt(mid)
        if found is not None:
            best, lo = found, mid
        else:
            hi = mid - 1
    return best


def side_of(align: str, direction: str) -> str:
    """``left`` / ``right`` / ``centre`` for an ``align`` of start / end / centre: start is the right for Hebrew."""
    side = {"start": "left", "end": "right", "centre": "centre"}[align]
    if direction == "rtl" and side != "centre":
        side = "right" if side == "left" else "left"
    return side


def draw_text(draw: ImageDraw.ImageDraw, fitted: FittedText, font: ImageFont.FreeTypeFont, origin: tuple[int, int],
              box_width: int, align: str, fill) -> list[tuple[int, int, int, int]]:
    """Draw ``fitted`` with its top-left at ``origin`` in a box ``box_width`` wide; returns each line's
    (left, top, width, height). ``align`` start / centre / end follows the text's direction."""
    boxes = []
    ascent, descent = font.getmetrics()
    side = side_of(align, fitted.direction)
    x0, y0 = origin
    kwargs = {"direction": fitted.direction} if layout_engine() == "raqm" else {}
    for i, (line, w) in enumerate(zip(fitted.lines, fitted.widths)):
        x = x0 if side == "left" else x0 + box_width - w if side == "right" else x0 + (box_width - w) // 2
        y = y0 + i * fitted.pitch
        draw.text((x, y), line, font=font, fill=fill, anchor="la", **kwargs)
        boxes.append((x, y, w, ascent + descent))
    return boxes


def text_mask(size: tuple[int, int], fitted: FittedText, font: ImageFont.FreeTypeFont, origin: tuple[int, int],
              box_width: int, align: str) -> Image.Image:
    """The text's coverage (L, 255 = ink) on a canvas of ``size``."""
    mask = Image.new("L", size, 0)
    draw_text(ImageDraw.Draw(mask), fitted, font, origin, box_width, align, 255)
    return mask

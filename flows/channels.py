"""Channel formats (``templates/channels.yaml``) and the generation size a model should render each one at."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from engine.packshot import Placement, PlacementError
from engine.upscale.chain import Chain, ChainError, parse_chain
from flows.fast_setting import FastModeError, canonical_fast
from flows.template_config import (
    TEMPLATES_DIR,
    TemplatingConfigError,
    check_keys,
    check_name,
    config_text,
    load_section,
    positive_int,
)

__all__ = ["CHANNEL_FORMATS", "DEFAULT_TEMPLATE", "ChannelFormat", "load_channels", "native_size_for"]

CHANNEL_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
DEFAULT_TEMPLATE = "default"


@dataclass(frozen=True)
class ChannelFormat:
    name: str
    width: int
    height: int
    format: str  # png | jpeg | webp
    max_kb: int
    description: str
    template: str = DEFAULT_TEMPLATE
    # The upscale chain (``upscale:`` key; see engine.upscale.chain); None = the default, fit(WxH).
    upscale: Chain | None = None
    source: str = ""  # the channels file this entry came from, for messages about it
    # Where a row's product packshot goes on this channel unless the row says (``product:`` key; engine.packshot).
    product: Placement = Placement()
    # The fast mode its images render with unless a row says (``fast:`` key; flows.fast_setting): canonical text,
    # "" = off (exact, even if the run asks for a fast mode); None = the run's.
    fast: str | None = None

    @property
    def upscale_key(self) -> str:
        """``<file>: key 'channels.<name>.upscale'``: where this channel's chain is written."""
        return f"{self.source or 'channels.yaml'}: key 'channels.{self.name}.upscale'"

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def orientation(self) -> str:
        if self.width == self.height:
            return "square"
        return "landscape" if self.width > self.height else "portrait"


def load_channels(path: str | os.PathLike[str] | None = None) -> dict[str, ChannelFormat]:
    """Channel formats by name from ``path`` (default ``templates/channels.yaml``), in file order.

    Raises :class:`TemplatingConfigError` naming the file and the key (``channels.<name>.<field>``)
    for any bad entry.
    """
    path = Path(path) if path is not None else TEMPLATES_DIR / "channels.yaml"
    file = os.fspath(path)
    out: dict[str, ChannelFormat] = {}
    for name, entry in load_section(path, "channels").items():
        name = check_name(file, "channels", name)
        where = f"channels.{name}"
        entry = check_keys(
            file, where, entry, {"width", "height", "format", "max_kb"}, {"description", "template", "upscale", "product", "fast"}
        )
        fmt = entry["format"]
        if fmt not in CHANNEL_FORMATS:
            raise TemplatingConfigError(
                f"{file}: key '{where}.format': unknown format {fmt!r} (expected one of {', '.join(CHANNEL_FORMATS)})"
            )
        template = config_text(file, f"{where}.template", entry.get("template", DEFAULT_TEMPLATE), allow_empty=False)
        width = positive_int(file, f"{where}.width", entry["width"])
        height = positive_int(file, f"{where}.height", entry["height"])
        out[name] = ChannelFormat(
            name=name,
            width=width,
            height=height,
            format=fmt,
            max_kb=positive_int(file, f"{where}.max_kb", entry["max_kb"]),
            description=config_text(file, f"{where}.description", entry.get("description")),
            template=template,
            upscale=_upscale_chain(file, f"{where}.upscale", entry.get("upscale"), width, height),
            source=file,
            product=_placement(file, f"{where}.product", entry.get("product")),
            fast=_fast(file, f"{where}.fast", entry.get("fast")),
        )
    return out


def _placement(file: str, where: str, value: object) -> Placement:
    if value is None:
        return Placement()
    if not isinstance(value, str) or not value.strip():
        raise TemplatingConfigError(f"{file}: key '{where}': expected a placement as text, e.g. 'bottom:0.55:0.05', got {value!r}")
    try:
        return Placement.parse(value)
    except PlacementError as exc:
        raise TemplatingConfigError(f"{file}: key '{where}': {exc}") from None


def _fast(file: str, where: str, value: object) -> str | None:
    if value is None:
        return None
    if value is False:  # YAML reads a bare `off` (or `no`, `false`) as false
        return ""
    if not isinstance(value, str):
        raise TemplatingConfigError(f"{file}: key '{where}': expected a fast mode as text, e.g. 'cache:3', "
                                    f"'tome:0.5' or 'off', got {value!r}")
    try:
        return canonical_fast(value)
    except FastModeError as exc:
        raise TemplatingConfigError(f"{file}: key '{where}': {exc}") from None


def _upscale_chain(file: str, where: str, value: object, width: int, height: int) -> Chain | None:
    """A channel's ``upscale:`` chain, checked: it parses and ends with ``fit()`` at the channel's exact size."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise TemplatingConfigError(f"{file}: key '{where}': expected an upscale chain as text, e.g. "
                                    f"'hires(scale=2, denoise=0.4) -> fit({width}x{height})', got {value!r}")
    try:
        chain = parse_chain(value)
    except ChainError as exc:
        raise TemplatingConfigError(f"{file}: key '{where}': {exc}") from None
    fit = chain.fit
    assert fit is not None  # parse_chain requires it
    if (fit.width, fit.height) != (width, height):
        raise TemplatingConfigError(f"{file}: key '{where}': the chain ends with fit({fit.width}x{fit.height}) but the "
                                    f"channel delivers {width}x{height}; end it with fit({width}x{height})")
    return chain


def native_size_for(channel: ChannelFormat, native: int, multiple: int = 8) -> tuple[int, int]:
    """Generation size ``(width, height)`` for ``channel`` on a model trained at ``native`` x ``native``.

    Rule: with ``r = long side / short side`` of the channel, the ideal short side is
    ``native / sqrt(r)`` (so that short * long = native**2). Both multiples of ``multiple`` next to it
    (floor and ceil, at least ``multiple``) are tried; for each the long side is the multiple nearest
    ``short * r``. The pair whose aspect ratio is closest to the channel's wins; a tie goes to the area
    closer to ``native**2``. Examples at 512: square 512x512, 9:16 story 384x680, 728x90 leaderboard 1488x184.
    """
    if native < multiple or multiple < 1:
        raise ValueError(f"native ({native}) must be at least multiple ({multiple}) and multiple >= 1")
    short_px, long_px = sorted((channel.width, channel.height))
    ratio = long_px / short_px
    ideal = native / math.sqrt(ratio)
    best: tuple[float, float, int, int] | None = None
    candidates = {math.floor(ideal / multiple) * multiple, math.ceil(ideal / multiple) * multiple}
    for short in sorted(max(multiple, c) for c in candidates):
        long = max(multiple, round(short * ratio / multiple) * multiple)
        score = (abs(math.log((long / short) / ratio)), abs(math.log(short * long / native**2)), short, long)
        if best is None or score < best:
            best = score
    assert best is not None
    short, long = best[2], best[3]
    return (long, short) if channel.width > channel.height else (short, long)

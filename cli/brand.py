"""``adforge brand list / check / preview``: the brand kits under ``templates/brands/``, for the people who write them.

* ``list`` shows every kit (its layouts, logo variants and content hash) and the one-line problem of any that does
  not load.
* ``check BRAND`` fits sample copy into the kit's layout on every channel, the way planning does for a brief row,
  so a kit that cannot hold a headline on the leaderboard is found before a brief names it.
* ``preview BRAND --channel C`` draws the overlay on a placeholder picture of the channel's exact size (optionally
  with a product packshot where the channel puts it) and outlines the safe zone and each element's box: what a
  designer checks a layout against. The placeholder is computed, never random, so the same inputs give the same
  PNG bytes and a preview can be diffed or kept in review threads.

Settings resolve as everywhere (``--templates-dir`` > ``adforge.toml``'s ``templates_dir`` > the project's
templates/). Failures print one line (``cli.errors.fail``): 2 for bad input (unknown brand or channel, a kit that
does not load, an unreadable packshot), 1 for a kit whose layout cannot hold the copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.errors import console, fail, open_image
from cli.options import ConfigOpt, load_settings
from flows.safe_text import visible

if TYPE_CHECKING:
    from PIL import Image

    from engine.packshot import Placement
    from flows.brand.kit import BrandKit
    from flows.channels import ChannelFormat

__all__ = ["app", "brand_check", "brand_list", "brand_preview"]

app = typer.Typer(no_args_is_help=True, help="Brand kits: list them, check their layouts, preview an overlay.")

SAMPLE_HEADLINE = "Your headline here"
SAMPLE_BODY = "Body copy that runs a little longer than the headline does"
SAMPLE_CTA = "Shop now"

TemplatesDirOpt = Annotated[Path | None, typer.Option(
    "--templates-dir", help="Folder with brands/ and channels.yaml (default: adforge.toml's templates_dir, else the project's templates/).")]
HeadlineOpt = Annotated[str, typer.Option("--headline", help="Sample headline.")]
BodyOpt = Annotated[str, typer.Option("--body", help="Sample body copy.")]
CtaOpt = Annotated[str, typer.Option("--cta", help="Sample call to action.")]
ProductOpt = Annotated[Path | None, typer.Option(
    "--product", help="Product packshot (PNG with transparency), placed where the channel puts products.")]
PlacementOpt = Annotated[str | None, typer.Option(
    "--placement", help="Where the product goes instead of the channel's default: ANCHOR[:SCALE[:MARGIN[:SHADOW]]].")]

def _shown(text: object) -> str:
    """Text for the terminal: control characters spelled out, Rich markup escaped."""
    return escape(visible(str(text)))


def _templates_dir(config: Path | None, templates_dir: Path | None) -> str | None:
    settings = load_settings(config, templates_dir=str(templates_dir) if templates_dir is not None else None)
    return settings.templates_dir


def _kit(brand: str, templates_dir: str | None) -> BrandKit:
    from flows.brand.kit import KitError, load_kit

    try:
        return load_kit(brand, templates_dir)
    except KitError as exc:  # file:line:col: message
        raise fail(exc, 2) from None


def _channels(templates_dir: str | None) -> dict[str, ChannelFormat]:
    from flows.channels import load_channels
    from flows.template_config import TemplatingConfigError

    try:
        return load_channels(Path(templates_dir) / "channels.yaml" if templates_dir else None)
    except TemplatingConfigError as exc:
        raise fail(exc, 2) from None


def _pick_channels(table: dict[str, ChannelFormat], names: list[str]) -> list[ChannelFormat]:
    unknown = [n for n in names if n not in table]
    if unknown:
        raise fail(f"unknown channel {unknown[0]!r} (channels: {', '.join(table)})", 2)
    return [table[n] for n in dict.fromkeys(names)] if names else list(table.values())


def _copy(headline: str, body: str, cta: str):
    """The sample copy, refused (exit 2) where a brief's copy would be: too long, or holding control characters."""
    from flows.brand.compose import Copy
    from flows.brand.text import check_copy

    for option, text in (("--headline", headline), ("--body", body), ("--cta", cta)):
        problem = check_copy(text)
        if problem:
            raise fail(f"{option}: {problem}", 2)
    return Copy(headline.strip(), body.strip(), cta.strip())


def _product(path: Path | None) -> Image.Image | None:
    """The packshot trimmed to its opaque extent (engine.packshot.packshot_rgba), or None; one line and exit 2 if
    it cannot be read or has no transparency."""
    if path is None:
        return None
    from engine.packshot import PlacementError, packshot_rgba

    try:
        image = open_image(path, "product packshot", "--product")
    except typer.BadParameter as exc:  # one line here, not Click's usage box
        raise fail(f"--product: {exc.message}", 2) from None
    try:
        return packshot_rgba(image)
    except PlacementError as exc:
        raise fail(f"--product {path}: {exc}", 2) from None


def _placement(text: str | None) -> Placement | None:
    if text is None:
        return None
    from engine.packshot import Placement, PlacementError

    try:
        return Placement.parse(text)
    except PlacementError as exc:
        raise fail(f"--placement: {exc}", 2) from None


# ------------------------------------------------------------------------------------------------ list


@app.command("list")
def brand_list(templates_dir: TemplatesDirOpt = None, config: ConfigOpt = None) -> None:
    """The brand kits: key, name, layouts, logo variants and content hash; a kit that does not load with its problem."""
    tdir = _templates_dir(config, templates_dir)
    from flows.brand.kit import KitError, brands_dir, kit_names, load_kit

    names = kit_names(tdir)
    out = Console(highlight=False)
    if not names:
        out.print(f"no brand kits in {_shown(brands_dir(tdir))}", soft_wrap=True)
        return
    table = Table("key", "name", "layouts", "logos", "sha256")
    problems: list[str] = []
    for name in names:
        try:
            kit = load_kit(name, tdir)
        except KitError as exc:
            table.add_row(_shown(name), "[red]does not load[/red]", "", "", "")
            problems.append(str(exc))
            continue
        table.add_row(_shown(kit.key), _shown(kit.name), _shown(", ".join(kit.layouts)), _shown(", ".join(sorted(kit.logos))),
                      kit.sha256[:12])
    out.print(table)
    # After the table, one whole line each: a file:line:col a terminal or an editor can jump to, never wrapped.
    for problem in problems:
        console.print(f"[red]error:[/red] {_shown(problem)}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------ check


@app.command("check")
def brand_check(
    brand: Annotated[str, typer.Argument(help="Brand kit name (templates/brands/<brand>.yaml).")],
    channel: Annotated[list[str] | None, typer.Option("--channel", "-c", help="Channel to check (repeatable; default: all).")] = None,
    headline: HeadlineOpt = SAMPLE_HEADLINE,
    body: BodyOpt = SAMPLE_BODY,
    cta: CtaOpt = SAMPLE_CTA,
    product: ProductOpt = None,
    placement: PlacementOpt = None,
    templates_dir: TemplatesDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fit sample copy into the kit's layout on each channel: the layout used and each text's font size, or why not."""
    tdir = _templates_dir(config, templates_dir)
    kit = _kit(brand, tdir)
    channels = _pick_channels(_channels(tdir), channel or [])
    copy = _copy(headline, body, cta)
    packshot = _product(product)
    where = _placement(placement)
    from flows.brand.compose import OverlayProblem, fit_overlay
    from flows.brand.kit import TEXT_ELEMENTS

    # Channel and layout names stay whole (they are what a reader looks up); a problem goes below the table, on
    # one line of its own, so it is never cut to fit a column.
    table = Table(box=box.SIMPLE_HEAD, caption="font sizes in px; xN: on N lines", caption_justify="left")
    for name in ("channel", "size", "layout", *TEXT_ELEMENTS):
        table.add_column(name, no_wrap=True)
    problems: list[str] = []
    for ch in channels:
        size = (ch.width, ch.height)
        box_ = (where or ch.product).box(size, packshot.size) if packshot is not None else None
        layout = kit.layout_for(ch.name).name
        try:
            _, fitted = fit_overlay(kit, ch.name, size, copy, box_)
        except OverlayProblem as exc:
            problems.append(f"{ch.name} ({ch.width}x{ch.height}): {exc}")
            cells = ["[red]does not fit[/red]" if exc.element == element else "" for element in TEXT_ELEMENTS]
            if exc.element not in TEXT_ELEMENTS:  # the logo: it would cover the product
                cells[0] = f"[red]{_shown(exc.element)} does not fit[/red]"
            table.add_row(ch.name, f"{ch.width}x{ch.height}", _shown(layout), *cells)
            continue
        cells = []
        for element in TEXT_ELEMENTS:
            if element in fitted:
                text = fitted[element][0]
                cells.append(f"{text.size}" + (f" x{len(text.lines)}" if len(text.lines) > 1 else ""))
            else:  # no copy given, or the layout leaves the element out on this channel
                cells.append("-")
        table.add_row(ch.name, f"{ch.width}x{ch.height}", _shown(layout), *cells)
    failed = len(problems)
    out = Console(highlight=False)
    out.print(table)
    if failed:
        for problem in problems:
            console.print(f"[red]error:[/red] {_shown(problem)}", soft_wrap=True)
        console.print(f"[red]{failed} of {len(channels)} channel(s) cannot hold the copy[/red] with brand "
                      f"'{_shown(kit.key)}' ({kit.sha256[:12]})", soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"brand '{_shown(kit.key)}' ({kit.sha256[:12]}): the copy fits on {len(channels)} channel(s)", soft_wrap=True)


# ------------------------------------------------------------------------------------------------ preview


def _summary(record: dict, min_contrast: float) -> list[str]:
    """One line per element: its size, how it was made readable, and its contrast (flagged below its floor: the
    kit's for texts, the logo's own for the logo, which a kit without a logo plate cannot raise)."""

    def ratio(value: object, floor: float = min_contrast) -> str:
        low = isinstance(value, (int, float)) and value < floor
        return f"contrast {value}:1" + (f" (below {floor:g}:1)" if low else "")

    lines = []
    if "logo" in record:
        logo = record["logo"]
        plate = (f" on a {logo['plate']} plate at {logo.get('plate_opacity', 0) * 100:.0f} %" if logo.get("plate") else "")
        lines.append(f"  logo      {logo.get('variant')} variant at {logo.get('box')}{plate}, "
                     f"{ratio(logo.get('contrast'), float(logo.get('min_contrast', 3.0)))}")
    for element in ("headline", "body", "cta"):
        if element not in record:
            continue
        r = record[element]
        choice = r.get("choice")
        if choice == "button":
            how = f"on a {r.get('background')} button"
        elif choice == "scrim":
            how = f"on a {r.get('scrim')} scrim at {round(float(r.get('scrim_opacity', 1)) * 100)} %"
        else:
            how = f"({choice})"
        lines.append(f"  {element:<9} {r.get('size')} px, {len(r.get('lines', ()))} line(s), {r.get('colour')} {how}, "
                     f"{ratio(r.get('contrast'))}")
    if record.get("moved_for_product"):
        lines.append(f"  moved off the product: {', '.join(record['moved_for_product'])}")
    return lines


@app.command("preview")
def brand_preview(
    brand: Annotated[str, typer.Argument(help="Brand kit name (templates/brands/<brand>.yaml).")],
    channel: Annotated[str, typer.Option("--channel", "-c", help="Channel whose size and layout to preview.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write (default: ./brand-preview-<brand>-<channel>.png).")] = None,
    headline: HeadlineOpt = SAMPLE_HEADLINE,
    body: BodyOpt = SAMPLE_BODY,
    cta: CtaOpt = SAMPLE_CTA,
    product: ProductOpt = None,
    placement: PlacementOpt = None,
    safe_zones: Annotated[bool, typer.Option("--safe-zones/--no-safe-zones", help="Outline the safe zone and each element's box.")] = True,
    background: Annotated[str, typer.Option("--background", help="Placeholder picture: light, dark or busy.")] = "busy",
    templates_dir: TemplatesDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Draw the kit's overlay on a placeholder picture of the channel's exact size; the same inputs give the same PNG."""
    from flows.brand.preview import BACKGROUNDS, guides, placeholder

    if background not in BACKGROUNDS:
        raise fail(f"--background: expected one of {', '.join(BACKGROUNDS)}, got {background!r}", 2)
    tdir = _templates_dir(config, templates_dir)
    kit = _kit(brand, tdir)
    (ch,) = _pick_channels(_channels(tdir), [channel])
    copy = _copy(headline, body, cta)
    packshot = _product(product)
    where = _placement(placement) or ch.product
    from engine.packshot import finish, product_layer
    from flows.brand.compose import OverlayProblem, compose

    size = (ch.width, ch.height)
    picture = placeholder(size, background)
    layer = None
    if packshot is not None:
        # As delivery does it: the packshot resized once into its box, a contact shadow, its pixels pasted exact.
        layer = product_layer(packshot, size, where)
        picture = finish(picture, layer, where.shadow)
    try:
        drawn, record = compose(picture, kit, ch.name, copy, layer.box if layer is not None else None)
    except OverlayProblem as exc:
        raise fail(exc, 1) from None
    if safe_zones:
        drawn = guides(drawn, record, layer)
    target = out if out is not None else Path(f"brand-preview-{kit.key}-{ch.name}.png")
    try:
        drawn.save(target, format="PNG")  # Pillow writes no time stamp: equal pixels, equal bytes
    except OSError as exc:
        raise fail(f"cannot write {target}: {exc.strerror or exc}", 2) from None
    stdout = Console(highlight=False)
    stdout.print(f"wrote {_shown(target)} ({ch.width}x{ch.height}, brand '{_shown(kit.key)}' {kit.sha256[:12]}, layout "
                 f"'{_shown(record['layout'])}', {background} background"
                 + (f", product {where.canonical} at {list(layer.box)}" if layer is not None else "") + ")", soft_wrap=True)
    for line in _summary(record, kit.min_contrast):
        stdout.print(_shown(line), soft_wrap=True)

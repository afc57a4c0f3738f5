"""Planning a row's overlay: its brand kit, its copy (the row's cells, else the kit's templates over the row's
columns) and, per channel, the layout fitted around the row's product, so a text that cannot fit, a missing font or
logo and an unknown brand are refused by file, line and column before anything renders. The variant pins the kit's
content hash and the copy (:class:`storage.variants.OverlayPin`); rendering draws exactly that."""

from __future__ import annotations

import os

import jinja2
import jinja2.meta
import jinja2.sandbox

from flows.brand.cells import COPY_COLUMNS
from flows.brand.compose import Copy, OverlayProblem, fit_overlay
from flows.brand.kit import BrandKit, KitError, load_kit
from flows.brand.text import check_copy
from flows.brief import BriefRow
from flows.channels import ChannelFormat
from storage.variants import OverlayPin, overlay_text

__all__ = ["OverlayRowProblem", "RowOverlays", "row_copy", "row_variables"]


class OverlayRowProblem(ValueError):
    """A row whose overlay cannot be planned; ``column`` is the brief column to fix."""

    def __init__(self, message: str, column: str):
        self.column = column
        super().__init__(message)


def row_variables(row: BriefRow) -> dict[str, str]:
    """What a kit's copy template can use: the row's columns by their normalised names."""
    out = {"campaign": row.campaign, "row_id": row.row_id, "subject": row.subject, "message": row.message,
           "audience": row.audience, "style": row.style}
    out.update(row.extra)
    return out


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def row_copy(kit: BrandKit, row: BriefRow) -> tuple[Copy, dict[str, str]]:
    """The row's copy, and for each text the brief column it came from (for messages)."""
    texts: dict[str, str] = {}
    sources: dict[str, str] = {}
    variables = row_variables(row)
    for element in COPY_COLUMNS:
        written = getattr(row.brand, element)
        if written:
            texts[element], sources[element] = written, element
            continue
        template = kit.copy.get(element)
        if template is None:
            texts[element] = ""
            continue
        names = sorted(jinja2.meta.find_undeclared_variables(_ENV.parse(template.value)))
        sources[element] = next((n for n in names if n in variables), element)
        missing = [n for n in names if n not in variables]
        if missing:
            raise OverlayRowProblem(f"the brand kit's {element} template ({template.file}:{template.line}:"
                                    f"{template.column}) uses the column '{missing[0]}', which the brief does not "
                                    f"have; add it or write the {element} column", element)
        try:
            text = _ENV.from_string(template.value).render(**variables)
        except jinja2.TemplateError as exc:
            raise OverlayRowProblem(f"the brand kit's {element} template ({template.file}:{template.line}:"
                                    f"{template.column}) failed: {exc}", sources[element]) from None
        text = text.replace("\r\n", "\n").strip()
        if text and (problem := check_copy(text)):
            raise OverlayRowProblem(f"{element} from the brand kit's template: {problem}", sources[element])
        texts[element] = text
    return Copy(**texts), sources


class RowOverlays:
    """The rows' overlays for one plan (kits loaded once)."""

    def __init__(self, templates_dir: str | os.PathLike[str] | None):
        self.templates_dir = templates_dir
        self._kits: dict[str, BrandKit | str] = {}

    def kit(self, name: str) -> BrandKit:
        if name not in self._kits:
            try:
                self._kits[name] = load_kit(name, self.templates_dir)
            except KitError as exc:
                self._kits[name] = str(exc)
        found = self._kits[name]
        if isinstance(found, str):
            raise OverlayRowProblem(found, "brand")
        return found

    def pin(self, row: BriefRow, channel: ChannelFormat, product_box: tuple[int, int, int, int] | None) -> str:
        """The variant's ``overlay`` text for ``channel`` ("" for a row without a brand), checked: every text fits
        its box on the delivered canvas beside the product."""
        if not row.brand.brand:
            return ""
        kit = self.kit(row.brand.brand)
        copy, sources = row_copy(kit, row)
        try:
            fit_overlay(kit, channel.name, (channel.width, channel.height), copy, product_box)
        except OverlayProblem as exc:
            column = sources.get(exc.element, "placement" if exc.element == "logo" else "brand")
            raise OverlayRowProblem(f"channel '{channel.name}' ({channel.width}x{channel.height}), brand "
                                    f"'{kit.key}': {exc}", column) from None
        layout = kit.layout_for(channel.name).name
        return overlay_text(OverlayPin(brand=kit.key, kit=kit.sha256, layout=layout, headline=copy.headline,
                                       body=copy.body, cta=copy.cta))

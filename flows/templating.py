"""Prompt templating: a brief row + a channel -> prompt variants, through Jinja2 templates and ``{a|b}`` variations.

Data lives in ``templates/`` (see ``templates/channels.yaml``, ``templates/styles.yaml`` and
``templates/prompts/*.j2``). Channel formats are loaded by :mod:`flows.channels`, style presets by
:mod:`flows.styles`, variations are expanded by :mod:`flows.variations`; this module renders the templates.

Rendering a row for a channel (:func:`render_prompts`) goes in this order:

1. the channel's template (``channels.yaml`` ``template:``, default ``default``) or the one named is
   rendered with Jinja2 (``StrictUndefined``: a variable the row lacks is an error naming the template
   and the variable);
2. variation groups ``{a|b}`` in the *rendered* text are expanded (:func:`expand_variations`), so
   values from the brief may carry variations too, and Jinja2's ``{{ }}`` / ``{% %}`` / ``{# #}`` never
   meet the variation parser;
3. each result is tidied (runs of whitespace -> one space, empty comma items dropped) and duplicates
   are dropped, keeping the first.

Template variables: ``subject``, ``message``, ``audience``, ``campaign``, ``row_id``, ``style`` (the
preset's positive text when the row's style names a preset, else the row's text verbatim),
``style_name`` (the row's style text as written), ``channel`` (name), ``width``, ``height``,
``orientation`` (``square`` / ``portrait`` / ``landscape``), ``extra`` (dict of extra columns) and
every extra brief column by its normalised name (canonical names win on a clash).

Inside a ``.j2`` template a variation group must not begin with ``{`` or ``#`` right after its
opening brace (``{{a|b} c|d}`` and ``{#x|y}`` would be read by Jinja2); write ``{ {a|b} c|d}``
(the extra space is tidied away) instead.
"""

from __future__ import annotations

import functools
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2

from flows.brief import BriefRow, normalize_name
from flows.channels import ChannelFormat, load_channels
from flows.styles import StylePreset, load_styles
from flows.template_config import TEMPLATES_DIR
from flows.variations import expand_variations

__all__ = ["PromptVariant", "TemplateError", "render_prompts"]


class TemplateError(ValueError):
    """A prompt template that cannot be found or rendered: the message names the template."""


@dataclass(frozen=True)
class PromptVariant:
    prompt: str
    negative_prompt: str
    template_name: str
    variation_index: int  # 0-based position among this row/channel's variants


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _environment(directory: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )


_EMPTY_ITEMS = re.compile(r"\s*,(?:\s*,)+\s*")


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = _EMPTY_ITEMS.sub(", ", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip().strip(",").strip()


def _join(*parts: str) -> str:
    return ", ".join(p.strip().strip(",").strip() for p in parts if p and p.strip().strip(","))


def render_prompts(
    row: BriefRow,
    channel: str | ChannelFormat,
    template: str | None = None,
    styles: Mapping[str, StylePreset] | None = None,
    *,
    channels: Mapping[str, ChannelFormat] | None = None,
    templates_dir: str | os.PathLike[str] | None = None,
    mode: Literal["combinatorial", "random"] = "combinatorial",
    seed: int | None = None,
    count: int | None = None,
) -> list[PromptVariant]:
    """Prompt variants of ``row`` for ``channel``; see the module docstring for the steps and variables.

    ``channel`` is a :class:`ChannelFormat` or a name looked up in ``channels`` (default
    :func:`load_channels`). ``template`` is a template name in ``templates_dir`` (default
    ``templates/prompts``; ``<name>.j2``); default: the channel's template. ``styles`` default
    :func:`load_styles` (pass ``{}`` for none). ``mode`` / ``count`` / ``seed`` go to
    :func:`expand_variations`; in ``random`` mode ``seed`` defaults to ``row.seed`` and ``count`` to
    ``row.variants``. The negative prompt is ``row.negative_prompt`` then the preset's negative,
    joined with ``", "``. Raises :class:`TemplateError` (template missing, variable undefined,
    unbalanced variation brace) naming the template.
    """
    if isinstance(channel, str):
        table = load_channels() if channels is None else channels
        key = normalize_name(channel)
        if key not in table:
            raise KeyError(f"unknown channel '{channel}' (known: {', '.join(sorted(table))})")
        fmt = table[key]
    else:
        fmt = channel
    styles = load_styles() if styles is None else styles
    directory = Path(templates_dir) if templates_dir is not None else TEMPLATES_DIR / "prompts"
    name = template or fmt.template

    preset = styles.get(normalize_name(row.style)) if row.style else None
    context: dict[str, object] = dict(row.extra)
    context.update(
        subject=row.subject,
        message=row.message,
        audience=row.audience,
        campaign=row.campaign,
        row_id=row.row_id,
        style=preset.positive if preset is not None else row.style,
        style_name=row.style,
        channel=fmt.name,
        width=fmt.width,
        height=fmt.height,
        orientation=fmt.orientation,
        extra=dict(row.extra),
    )

    env = _environment(os.fspath(directory))
    try:
        tmpl = env.get_template(f"{name}.j2")
    except jinja2.TemplateNotFound:
        raise TemplateError(f"template '{name}': no file {directory / (name + '.j2')}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template '{name}' ({exc.filename}:{exc.lineno}): syntax error: {exc.message}") from None
    try:
        rendered = tmpl.render(context)
    except jinja2.UndefinedError as exc:
        line = next(
            (f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__)) if f.filename == tmpl.filename),
            None,
        )
        where = f"{tmpl.filename}:{line}" if line is not None else f"{tmpl.filename}"
        m = re.match(r"'([^']+)' is undefined", str(exc))
        what = f"variable '{m.group(1)}' is undefined" if m else str(exc)
        raise TemplateError(
            f"template '{name}' ({where}): {what} for row '{row.row_id}' (brief line {row.line}); "
            f"available: {', '.join(sorted(context))}"
        ) from None

    if mode == "random":
        seed = row.seed if seed is None else seed
        count = row.variants if count is None else count
    try:
        expanded = expand_variations(rendered, mode=mode, seed=seed, count=count)
    except ValueError as exc:
        raise TemplateError(
            f"template '{name}', row '{row.row_id}', channel '{fmt.name}': {exc} in rendered prompt {rendered!r}"
        ) from None

    negative = _join(row.negative_prompt, preset.negative if preset is not None else "")
    prompts = [_tidy(text) for text in expanded]
    if mode == "combinatorial":  # tidying may make two variations equal
        prompts = list(dict.fromkeys(prompts))
    if preset is not None:  # the preset's adapters and trigger words go in whatever the template says
        applied = [preset.apply(p, negative) for p in prompts]
        prompts, negative = [p for p, _ in applied], (applied[0][1] if applied else negative)
    return [
        PromptVariant(prompt=p, negative_prompt=negative, template_name=name, variation_index=i)
        for i, p in enumerate(prompts)
    ]

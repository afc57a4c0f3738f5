"""Prompt templating: channel formats, brand style presets, Jinja2 prompt templates, ``{a|b}`` variations.

Data lives in ``templates/`` (see ``templates/channels.yaml``, ``templates/styles.yaml`` and
``templates/prompts/*.j2``); this module loads, validates and applies it.

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
import itertools
import math
import os
import random
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2
import yaml

from engine.upscale.chain import Chain, ChainError, parse_chain
from flows.brief import BriefRow, normalize_name

__all__ = [
    "CHANNEL_FORMATS",
    "ChannelFormat",
    "PromptVariant",
    "StylePreset",
    "TemplateError",
    "TemplatingConfigError",
    "TEMPLATES_DIR",
    "expand_variations",
    "load_channels",
    "load_styles",
    "native_size_for",
    "render_prompts",
]

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
CHANNEL_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
DEFAULT_TEMPLATE = "default"
MAX_COMBINATIONS = 10_000


class TemplatingConfigError(ValueError):
    """A bad ``channels.yaml`` / ``styles.yaml``: the message names the file and the key."""


class TemplateError(ValueError):
    """A prompt template that cannot be found or rendered: the message names the template."""


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


@dataclass(frozen=True)
class StylePreset:
    name: str
    positive: str
    negative: str


@dataclass(frozen=True)
class PromptVariant:
    prompt: str
    negative_prompt: str
    template_name: str
    variation_index: int  # 0-based position among this row/channel's variants


# --------------------------------------------------------------------------- YAML loading


def _load_section(path: Path, section: str) -> dict:
    file = os.fspath(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplatingConfigError(f"{file}: cannot read file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        problem = getattr(exc, "problem", None) or str(exc)
        raise TemplatingConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get(section), dict):
        raise TemplatingConfigError(f"{file}: key '{section}': expected a mapping of names to entries")
    if not data[section]:
        raise TemplatingConfigError(f"{file}: key '{section}': no entries")
    return data[section]


def _check_name(file: str, section: str, name: object) -> str:
    if not isinstance(name, str) or not name or normalize_name(name) != name:
        hint = f" (use '{normalize_name(name)}')" if isinstance(name, str) and normalize_name(name) else ""
        raise TemplatingConfigError(
            f"{file}: key '{section}.{name}': name must be lower case words joined by '_'{hint}"
        )
    return name


def _check_keys(file: str, where: str, entry: object, required: set[str], optional: set[str]) -> dict:
    if not isinstance(entry, dict):
        raise TemplatingConfigError(f"{file}: key '{where}': expected a mapping, got {type(entry).__name__}")
    for key in entry:
        if key not in required and key not in optional:
            allowed = ", ".join(sorted(required | optional))
            raise TemplatingConfigError(f"{file}: key '{where}.{key}': unknown key (allowed: {allowed})")
    for key in sorted(required):
        if key not in entry:
            raise TemplatingConfigError(f"{file}: key '{where}.{key}': required key is missing")
    return entry


def _positive_int(file: str, where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TemplatingConfigError(f"{file}: key '{where}': expected a positive whole number, got {value!r}")
    return value


def _text(file: str, where: str, value: object, *, allow_empty: bool = True) -> str:
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise TemplatingConfigError(f"{file}: key '{where}': expected text, got {value!r}")
    return value.strip()


def load_channels(path: str | os.PathLike[str] | None = None) -> dict[str, ChannelFormat]:
    """Channel formats by name from ``path`` (default ``templates/channels.yaml``), in file order.

    Raises :class:`TemplatingConfigError` naming the file and the key (``channels.<name>.<field>``)
    for any bad entry.
    """
    path = Path(path) if path is not None else TEMPLATES_DIR / "channels.yaml"
    file = os.fspath(path)
    out: dict[str, ChannelFormat] = {}
    for name, entry in _load_section(path, "channels").items():
        name = _check_name(file, "channels", name)
        where = f"channels.{name}"
        entry = _check_keys(
            file, where, entry, {"width", "height", "format", "max_kb"}, {"description", "template", "upscale"}
        )
        fmt = entry["format"]
        if fmt not in CHANNEL_FORMATS:
            raise TemplatingConfigError(
                f"{file}: key '{where}.format': unknown format {fmt!r} (expected one of {', '.join(CHANNEL_FORMATS)})"
            )
        template = _text(file, f"{where}.template", entry.get("template", DEFAULT_TEMPLATE), allow_empty=False)
        width = _positive_int(file, f"{where}.width", entry["width"])
        height = _positive_int(file, f"{where}.height", entry["height"])
        out[name] = ChannelFormat(
            name=name,
            width=width,
            height=height,
            format=fmt,
            max_kb=_positive_int(file, f"{where}.max_kb", entry["max_kb"]),
            description=_text(file, f"{where}.description", entry.get("description")),
            template=template,
            upscale=_upscale_chain(file, f"{where}.upscale", entry.get("upscale"), width, height),
            source=file,
        )
    return out


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


def load_styles(path: str | os.PathLike[str] | None = None) -> dict[str, StylePreset]:
    """Brand style presets by name from ``path`` (default ``templates/styles.yaml``)."""
    path = Path(path) if path is not None else TEMPLATES_DIR / "styles.yaml"
    file = os.fspath(path)
    out: dict[str, StylePreset] = {}
    for name, entry in _load_section(path, "styles").items():
        name = _check_name(file, "styles", name)
        where = f"styles.{name}"
        entry = _check_keys(file, where, entry, set(), {"positive", "negative"})
        positive = _text(file, f"{where}.positive", entry.get("positive"))
        negative = _text(file, f"{where}.negative", entry.get("negative"))
        if not positive and not negative:
            raise TemplatingConfigError(f"{file}: key '{where}': needs a 'positive' or 'negative' text")
        out[name] = StylePreset(name=name, positive=positive, negative=negative)
    return out


# --------------------------------------------------------------------------- variations
#
# Parsed form: a sequence is a list of items; an item is a str (literal) or a list of
# alternatives, each alternative itself a sequence.


def _parse_variations(text: str) -> list:
    root: list = []
    # stack of (alternatives of the open group, position of its '{')
    stack: list[tuple[list[list], int]] = []
    current = root
    buf: list[str] = []

    def flush() -> None:
        if buf:
            current.append("".join(buf))
            buf.clear()

    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "{}|":
            buf.append(text[i + 1])
            i += 2
            continue
        if ch == "{":
            flush()
            alternatives: list[list] = [[]]
            current.append(alternatives)
            stack.append((alternatives, i))
            current = alternatives[0]
        elif ch == "|" and stack:
            flush()
            alternatives = stack[-1][0]
            alternatives.append([])
            current = alternatives[-1]
        elif ch == "}":
            if not stack:
                raise ValueError(f"unbalanced '}}' at position {i}: no '{{' to close (write \\}} for a literal brace)")
            flush()
            stack.pop()
            current = _innermost(root, stack)
        else:
            buf.append(ch)
        i += 1
    if stack:
        raise ValueError(
            f"unbalanced '{{' at position {stack[-1][1]}: never closed (write \\{{ for a literal brace)"
        )
    flush()
    return root


def _innermost(root: list, stack: list[tuple[list[list], int]]) -> list:
    """The sequence new items go to after closing a group: the last alternative of the enclosing group."""
    return stack[-1][0][-1] if stack else root


def _combinations(seq: list) -> list[str]:
    parts: list[list[str]] = []
    for item in seq:
        if isinstance(item, str):
            parts.append([item])
        else:
            options: list[str] = []
            for alternative in item:
                options.extend(_combinations(alternative))
            parts.append(options)
        total = math.prod(len(p) for p in parts)
        if total > MAX_COMBINATIONS:
            raise ValueError(f"too many combinations (more than {MAX_COMBINATIONS}); use mode='random'")
    return ["".join(p) for p in itertools.product(*parts)]


def _pick(seq: list, rng: random.Random) -> str:
    out: list[str] = []
    for item in seq:
        if isinstance(item, str):
            out.append(item)
        else:
            out.append(_pick(rng.choice(item), rng))
    return "".join(out)


def expand_variations(
    text: str,
    *,
    mode: Literal["combinatorial", "random"] = "combinatorial",
    seed: int | None = None,
    count: int | None = None,
) -> list[str]:
    """Expand ``{a|b}`` variation groups.

    ``combinatorial``: every combination, the leftmost group varying slowest, options in written
    order (``"{red|blue} {cube|ball}"`` -> red cube, red ball, blue cube, blue ball); duplicates
    dropped keeping the first; ``count`` (if given) keeps the first ``count``; more than
    ``MAX_COMBINATIONS`` is a ValueError.
    ``random``: ``count`` (default 1) independent picks, each group choosing uniformly among its
    options with ``random.Random(seed)``: the same seed gives the same list. Picks may repeat.

    Groups nest (``{a {b|c}|d}``); ``{x}`` is just ``x``; an option may be empty (``{a|}``);
    ``\\{`` ``\\}`` ``\\|`` are literal characters (other backslashes, e.g. ``\\(`` for prompt weighting,
    are kept as written); ``|`` outside a group is literal. An unbalanced brace raises ValueError
    naming its 0-based position in ``text``.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    tree = _parse_variations(text)
    if mode == "combinatorial":
        seen: dict[str, None] = {}
        for s in _combinations(tree):
            seen.setdefault(s, None)
        result = list(seen)
        return result if count is None else result[:count]
    if mode == "random":
        rng = random.Random(seed)
        return [_pick(tree, rng) for _ in range(1 if count is None else count)]
    raise ValueError(f"unknown mode {mode!r} (expected 'combinatorial' or 'random')")


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
    return [
        PromptVariant(prompt=p, negative_prompt=negative, template_name=name, variation_index=i)
        for i, p in enumerate(prompts)
    ]


# --------------------------------------------------------------------------- sizes


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

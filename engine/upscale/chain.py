"""The upscale chain syntax: what a channel does to a rendered image to reach its delivered size.

A chain is steps joined by ``->``, applied left to right::

    hires(scale=2, denoise=0.4, steps=12) -> model(4x-foo.safetensors, tile=512) -> fit(1080x1920)

Steps (arguments by name; the first one of ``model``, ``lanczos`` and ``fit`` may also be given by position):

``hires(scale=2, denoise=0.5, steps=N, upscaler=latent, tile=N, sha256=HEX)``
    A1111's hires fix: the image is rendered at the generation size, upscaled by ``scale`` (``upscaler``:
    ``latent`` = bilinear in latent space, ``latent-nearest``, ``lanczos`` in pixel space, or a model file), then
    re-rendered with img2img at strength ``denoise`` over a ``steps``-step schedule (default: the run's steps)
    with the same seed. Only as the first step: it needs the checkpoint and the seed.
``model(FILE, tile=N, overlap=N, sha256=HEX)``
    A super-resolution model file (``.pth`` / ``.safetensors``); its scale is read from the file.
``lanczos(scale=2)``
    Pillow's Lanczos resize by a factor.
``fit(WxH)``
    Scale (Lanczos) to cover W x H and crop the centre: the exact delivered size. Only as the last step.

``tile`` is in pixels (the model's input pixels for ``model``, the re-rendered image's pixels for ``hires``);
``0`` never tiles; without it a step tiles when its output is above :data:`engine.tiling.AUTO_TILE_PIXELS`.
``sha256`` pins a model file's content: the chain then names exactly one file, wherever it lies.

:meth:`Chain.canonical` writes the one text form of a chain (every argument that has a fixed default is written
out, numbers in shortest form, ``", "`` between arguments, ``" -> "`` between steps): two spellings of one
chain have the same canonical text, which is what identities and infotext record. Errors are
:class:`ChainError` with the 1-based column in the chain text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Union

__all__ = [
    "Chain",
    "ChainError",
    "Fit",
    "Hires",
    "Lanczos",
    "ModelStep",
    "Step",
    "HIRES_UPSCALERS",
    "MODEL_SUFFIXES",
    "parse_chain",
]

# Hires upscalers that are not model files; "latent" is bilinear like A1111's "Latent".
HIRES_UPSCALERS = ("latent", "latent-nearest", "lanczos")
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".sft")
MAX_SCALE = 16.0
MAX_SIDE = 32768  # a fit() side above this is a typo, not a print job
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"(\d+)[xX](\d+)")
_BARE = re.compile(r'[^\s(),="]+')


class ChainError(ValueError):
    """A chain that cannot be parsed or is not valid; ``column`` is 1-based in ``text``."""

    def __init__(self, text: str, column: int, problem: str):
        self.text, self.column, self.problem = text, column, problem
        super().__init__(f"upscale chain {text!r}, column {column}: {problem}")


def _num(value: float) -> str:
    return f"{value:g}"


def _quote(value: str) -> str:
    """A value as written in canonical text: bare when the grammar allows, else double-quoted."""
    if _BARE.fullmatch(value) and "->" not in value:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_model_file(name: str) -> bool:
    return name.lower().endswith(MODEL_SUFFIXES)


@dataclass(frozen=True)
class Hires:
    scale: float = 2.0
    denoise: float = 0.5
    steps: int | None = None  # None: the run's steps
    upscaler: str = "latent"  # one of HIRES_UPSCALERS, or a model file
    tile: int | None = None  # None: automatic; 0: never
    sha256: str | None = None  # pins the upscaler model file

    @property
    def model_file(self) -> str | None:
        return None if self.upscaler in HIRES_UPSCALERS else self.upscaler

    @property
    def latent(self) -> bool:
        return self.upscaler.startswith("latent")

    def canonical(self, pins: bool = True) -> str:
        args = [f"scale={_num(self.scale)}", f"denoise={_num(self.denoise)}"]
        if self.steps is not None:
            args.append(f"steps={self.steps}")
        args.append(f"upscaler={_quote(self.upscaler)}")
        if self.tile is not None:
            args.append(f"tile={self.tile}")
        if pins and self.sha256:
            args.append(f"sha256={self.sha256}")
        return f"hires({', '.join(args)})"


@dataclass(frozen=True)
class ModelStep:
    file: str
    tile: int | None = None  # input pixels; None: automatic; 0: never
    overlap: int | None = None  # input pixels; None: the tiler's default
    sha256: str | None = None

    @property
    def model_file(self) -> str:
        return self.file

    def canonical(self, pins: bool = True) -> str:
        args = [_quote(self.file)]
        if self.tile is not None:
            args.append(f"tile={self.tile}")
        if self.overlap is not None:
            args.append(f"overlap={self.overlap}")
        if pins and self.sha256:
            args.append(f"sha256={self.sha256}")
        return f"model({', '.join(args)})"


@dataclass(frozen=True)
class Lanczos:
    scale: float

    def canonical(self, pins: bool = True) -> str:
        return f"lanczos(scale={_num(self.scale)})"


@dataclass(frozen=True)
class Fit:
    width: int
    height: int

    def canonical(self, pins: bool = True) -> str:
        return f"fit({self.width}x{self.height})"


Step = Union[Hires, ModelStep, Lanczos, Fit]


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step, ...]

    def canonical(self, pins: bool = True) -> str:
        """The one text form of this chain; ``pins=False`` leaves out the ``sha256=`` pins (for people)."""
        return " -> ".join(step.canonical(pins) for step in self.steps)

    def __str__(self) -> str:
        return self.canonical()

    @property
    def hires(self) -> Hires | None:
        return self.steps[0] if self.steps and isinstance(self.steps[0], Hires) else None

    @property
    def pixel_steps(self) -> tuple[Step, ...]:
        """Everything after the hires fix: steps that only need the image."""
        return self.steps[1:] if self.hires is not None else self.steps

    @property
    def fit(self) -> Fit | None:
        return self.steps[-1] if self.steps and isinstance(self.steps[-1], Fit) else None

    @property
    def is_plain_fit(self) -> bool:
        """Only ``fit(WxH)``: the default chain, adforge's behaviour before chains existed."""
        return len(self.steps) == 1 and isinstance(self.steps[0], Fit)

    def model_files(self) -> list[tuple[int, str]]:
        """(step index, file) of every model file the chain uses, in chain order."""
        out = []
        for i, step in enumerate(self.steps):
            file = step.model_file if isinstance(step, (Hires, ModelStep)) else None
            if file:
                out.append((i, file))
        return out

    def pinned(self, sha256_by_step: dict[int, str]) -> "Chain":
        """This chain with ``sha256=`` set on the model steps given (step index -> sha256)."""
        steps = list(self.steps)
        for i, sha in sha256_by_step.items():
            steps[i] = replace(steps[i], sha256=sha)  # type: ignore[type-var]
        return Chain(tuple(steps))

    def sizes(self, width: int, height: int, model_scales: dict[int, int] | None = None) -> list[tuple[int, int]]:
        """The image size after each step, starting from a ``width`` x ``height`` render. ``model_scales`` gives
        the scale of each model step (step index -> scale); a model step not in it raises KeyError."""
        out = []
        w, h = width, height
        for i, step in enumerate(self.steps):
            if isinstance(step, Hires):
                w, h = hires_size(w, h, step.scale)
            elif isinstance(step, ModelStep):
                scale = (model_scales or {})[i]
                w, h = w * scale, h * scale
            elif isinstance(step, Lanczos):
                w, h = lanczos_size(w, h, step.scale)
            else:
                w, h = step.width, step.height
            out.append((w, h))
        return out


def hires_size(width: int, height: int, scale: float, multiple: int = 8) -> tuple[int, int]:
    """The second pass's size: ``scale`` times the first, each side rounded to a multiple of 8 (the VAE)."""
    # Halves round up (36 -> 40), not to even as round() would.
    return (max(multiple, math.floor(width * scale / multiple + 0.5) * multiple),
            max(multiple, math.floor(height * scale / multiple + 0.5) * multiple))


def lanczos_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


# ------------------------------------------------------------------------------------------------ parsing


@dataclass
class _Arg:
    name: str | None
    value: str
    column: int
    quoted: bool


@dataclass
class _RawStep:
    name: str
    column: int
    args: list[_Arg]


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def error(self, problem: str, at: int | None = None) -> ChainError:
        return ChainError(self.text, (self.i if at is None else at) + 1, problem)

    def skip_space(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.i >= len(self.text)

    def peek(self, s: str) -> bool:
        self.skip_space()
        return self.text.startswith(s, self.i)

    def name(self) -> tuple[str, int]:
        self.skip_space()
        m = _NAME.match(self.text, self.i)
        if not m:
            found = self.text[self.i] if self.i < len(self.text) else None
            raise self.error(f"expected a step name, found {found!r}" if found else "expected a step name, found the end")
        self.i = m.end()
        return m.group(0), m.start()

    def value(self) -> tuple[str, int, bool]:
        self.skip_space()
        start = self.i
        if self.i < len(self.text) and self.text[self.i] == '"':
            out = []
            j = self.i + 1
            while j < len(self.text):
                ch = self.text[j]
                if ch == "\\" and j + 1 < len(self.text):
                    out.append(self.text[j + 1])
                    j += 2
                    continue
                if ch == '"':
                    self.i = j + 1
                    return "".join(out), start, True
                out.append(ch)
                j += 1
            raise self.error("unterminated quoted value (no closing '\"')", start)
        m = _BARE.match(self.text, self.i)
        if not m:
            found = self.text[self.i] if self.i < len(self.text) else None
            raise self.error(f"expected a value, found {found!r}" if found else "expected a value, found the end")
        self.i = m.end()
        return m.group(0), start, False


def _scan(text: str) -> list[_RawStep]:
    sc = _Scanner(text)
    if sc.at_end():
        raise ChainError(text, 1, "empty chain: give at least one step, e.g. fit(1080x1080)")
    steps: list[_RawStep] = []
    while True:
        name, col = sc.name()
        args: list[_Arg] = []
        if sc.peek("("):
            sc.i += 1
            if sc.peek(")"):
                sc.i += 1
            else:
                while True:
                    sc.skip_space()
                    arg_start = sc.i
                    m = _NAME.match(text, sc.i)
                    after = m.end() if m else sc.i
                    rest = text[after:].lstrip()
                    if m and rest.startswith("="):
                        sc.i = text.index("=", after) + 1
                        value, _, quoted = sc.value()
                        args.append(_Arg(m.group(0), value, arg_start, quoted))
                    else:
                        value, vcol, quoted = sc.value()
                        args.append(_Arg(None, value, vcol, quoted))
                    if sc.peek(","):
                        sc.i += 1
                        continue
                    if sc.peek(")"):
                        sc.i += 1
                        break
                    if sc.at_end():
                        raise sc.error(f"'(' of {name} never closed: expected ',' or ')'")
                    raise sc.error(f"expected ',' or ')' in {name}(...), found {text[sc.i]!r}")
        steps.append(_RawStep(name, col, args))
        if sc.at_end():
            return steps
        if not sc.peek("->"):
            raise sc.error(f"expected '->' between steps, found {text[sc.i]!r}")
        sc.i += 2
        if sc.at_end():
            raise sc.error("'->' must be followed by a step")


# ------------------------------------------------------------------------------------------------ step builders


class _Args:
    """The arguments of one step: positional ones bound to names, each used at most once, unknown ones refused."""

    def __init__(self, text: str, raw: _RawStep, allowed: tuple[str, ...], positional: tuple[str, ...]):
        self.text, self.raw = text, raw
        self.values: dict[str, _Arg] = {}
        seen_named = False
        for i, arg in enumerate(raw.args):
            if arg.name is None:
                if seen_named or i >= len(positional):
                    what = "after a named argument" if seen_named else "here"
                    hint = f" (name it: {', '.join(a + '=' for a in allowed)})"
                    raise ChainError(text, arg.column + 1, f"{raw.name}(): positional value {arg.value!r} not allowed {what}{hint}")
                name = positional[i]
            else:
                seen_named = True
                name = arg.name
                if name not in allowed:
                    raise ChainError(text, arg.column + 1,
                                     f"{raw.name}(): unknown argument '{name}' (allowed: {', '.join(allowed)})")
            if name in self.values:
                raise ChainError(text, arg.column + 1, f"{raw.name}(): argument '{name}' given twice")
            self.values[name] = arg

    def error(self, name: str, problem: str) -> ChainError:
        arg = self.values[name]
        return ChainError(self.text, arg.column + 1, f"{self.raw.name}({name}={arg.value}): {problem}")

    def has(self, name: str) -> bool:
        return name in self.values

    def text_value(self, name: str) -> str:
        return self.values[name].value

    def number(self, name: str, low: float, high: float, *, low_open: bool = True) -> float:
        raw = self.values[name].value
        try:
            value = float(raw)
        except ValueError:
            raise self.error(name, f"{raw!r} is not a number") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) or value > high:
            bound = "(" if low_open else "["
            raise self.error(name, f"must be in {bound}{_num(low)}, {_num(high)}]")
        return value

    def whole(self, name: str, low: int, high: int | None = None, *, multiple: int = 1, zero_ok: bool = False) -> int:
        raw = self.values[name].value
        if not re.fullmatch(r"\d+", raw):
            raise self.error(name, f"{raw!r} is not a whole number")
        value = int(raw)
        if value == 0 and zero_ok:
            return 0
        if value < low or (high is not None and value > high):
            rng = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise self.error(name, f"must be {rng}" + (" (or 0 to never tile)" if zero_ok else ""))
        if value % multiple:
            raise self.error(name, f"must be a multiple of {multiple}")
        return value

    def sha256(self) -> str | None:
        if not self.has("sha256"):
            return None
        value = self.values["sha256"].value.lower()
        if not _SHA256.fullmatch(value):
            raise self.error("sha256", "expected the file's 64 hex digit sha256")
        return value


def _hires(text: str, raw: _RawStep) -> Hires:
    a = _Args(text, raw, ("scale", "denoise", "steps", "upscaler", "tile", "sha256"), ())
    hires = Hires()
    if a.has("scale"):
        hires = replace(hires, scale=a.number("scale", 1.0, MAX_SCALE, low_open=False))
    if a.has("denoise"):
        hires = replace(hires, denoise=a.number("denoise", 0.0, 1.0))
    if a.has("steps"):
        hires = replace(hires, steps=a.whole("steps", 1, 500))
    if a.has("upscaler"):
        up = a.text_value("upscaler")
        if up.lower() in HIRES_UPSCALERS:
            up = up.lower()
        elif not is_model_file(up):
            raise a.error("upscaler", f"unknown upscaler (use {', '.join(HIRES_UPSCALERS)}, or a model file "
                                      f"ending in {', '.join(MODEL_SUFFIXES)})")
        hires = replace(hires, upscaler=up)
    if a.has("tile"):
        hires = replace(hires, tile=a.whole("tile", 64, multiple=8, zero_ok=True))
    sha = a.sha256()
    if sha and hires.model_file is None:
        raise a.error("sha256", "pins a model file, but this hires step's upscaler is not one")
    return replace(hires, sha256=sha)


def _model(text: str, raw: _RawStep) -> ModelStep:
    a = _Args(text, raw, ("file", "tile", "overlap", "sha256"), ("file",))
    if not a.has("file"):
        raise ChainError(text, raw.column + 1, "model(): needs the model file, e.g. model(4x-foo.safetensors)")
    file = a.text_value("file")
    if not is_model_file(file):
        raise a.error("file", f"not a model file name (expected one ending in {', '.join(MODEL_SUFFIXES)})")
    tile = a.whole("tile", 16, zero_ok=True) if a.has("tile") else None
    overlap = a.whole("overlap", 0) if a.has("overlap") else None
    if tile and overlap is not None and overlap * 2 >= tile:
        raise a.error("overlap", f"must be less than half the tile ({tile})")
    return ModelStep(file=file, tile=tile, overlap=overlap, sha256=a.sha256())


def _lanczos(text: str, raw: _RawStep) -> Lanczos:
    a = _Args(text, raw, ("scale",), ("scale",))
    if not a.has("scale"):
        raise ChainError(text, raw.column + 1, "lanczos(): needs a scale, e.g. lanczos(scale=2)")
    return Lanczos(a.number("scale", 0.0, MAX_SCALE))


def _fit(text: str, raw: _RawStep) -> Fit:
    a = _Args(text, raw, ("size",), ("size",))
    if not a.has("size"):
        raise ChainError(text, raw.column + 1, "fit(): needs the delivered size, e.g. fit(1080x1920)")
    m = _SIZE.fullmatch(a.text_value("size"))
    if not m:
        raise a.error("size", "expected WIDTHxHEIGHT, e.g. 1080x1920")
    w, h = int(m.group(1)), int(m.group(2))
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise a.error("size", f"each side must be in [1, {MAX_SIDE}]")
    return Fit(w, h)


_BUILDERS = {"fit": _fit, "hires": _hires, "lanczos": _lanczos, "model": _model}


def parse_chain(text: str, *, require_fit: bool = True) -> Chain:
    """Parse and validate ``text``; ``require_fit``: the chain must end with ``fit(WxH)`` (an exact size)."""
    if not isinstance(text, str):
        raise ChainError(str(text), 1, f"expected the chain as text, got {type(text).__name__}")
    raw_steps = _scan(text)
    for raw in raw_steps:  # every name first: a typo is the clearest thing to report
        if raw.name.lower() not in _BUILDERS:
            raise ChainError(text, raw.column + 1, f"unknown step '{raw.name}' (known: {', '.join(sorted(_BUILDERS))})")
    steps: list[Step] = [_BUILDERS[raw.name.lower()](text, raw) for raw in raw_steps]
    for i, (raw, step) in enumerate(zip(raw_steps, steps)):
        if isinstance(step, Hires) and i != 0:
            raise ChainError(text, raw.column + 1, "hires() must be the first step: it re-renders the image with the "
                                                   "checkpoint and the seed, which only the first step has")
    for i, (raw, step) in enumerate(zip(raw_steps, steps)):
        if isinstance(step, Fit) and i != len(raw_steps) - 1:
            raise ChainError(text, raw.column + 1, "fit() must be the last step: it fixes the delivered size")
    if require_fit and not isinstance(steps[-1], Fit):
        raise ChainError(text, len(text.rstrip()) + 1, "missing final size: end the chain with fit(WxH), the delivered size")
    return Chain(tuple(steps))

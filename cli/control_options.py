"""``adforge generate --control TYPE:IMAGE[:STRENGTH[:START[:END]]]``: parsing, ControlNet choice, control images.

What can be checked before the model loads (the type, the image, the numbers) is checked by :func:`parse_controls`;
which ControlNet file goes with a type is decided once the model is loaded (:func:`resolve_controls`), since a file
must fit the model's family: ``--control-model TYPE=FILE_OR_NAME`` names it, or else the one file in the ControlNet
folder whose name carries the type's word (canny; softedge: also hed, pidi; pose: openpose; ...) and that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from PIL import Image

from cli.errors import open_image
from engine.control_library import TYPE_WORDS, ControlChoiceError, choose_controlnet

if TYPE_CHECKING:
    from engine.pipeline import Pipeline
    from engine.requests import ControlUse

__all__ = ["ControlSpec", "TYPE_WORDS", "parse_control_models", "parse_controls", "resolve_controls"]

@dataclass(frozen=True)
class ControlSpec:
    kind: str
    image: Image.Image
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


def _bad(message: str, option: str = "--control") -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=option)


def parse_controls(specs: list[str] | None) -> list[ControlSpec]:
    """Each ``TYPE:IMAGE[:STRENGTH[:START[:END]]]``, its image opened; BadParameter (one line) for a bad one."""
    out = []
    for spec in specs or ():
        parts = spec.split(":")
        if len(parts) < 2 or not parts[1]:
            raise _bad(f"{spec!r}: expected TYPE:IMAGE[:STRENGTH[:START[:END]]], e.g. canny:layout.png:0.8")
        if len(parts) > 5:
            raise _bad(f"{spec!r}: at most TYPE:IMAGE:STRENGTH:START:END")
        kind = parts[0].strip().lower()
        if kind not in TYPE_WORDS:
            raise _bad(f"{spec!r}: unknown control type {parts[0]!r}; types: {', '.join(TYPE_WORDS)}")
        numbers = []
        for what, text in zip(("strength", "start", "end"), parts[2:]):
            try:
                numbers.append(float(text))
            except ValueError:
                raise _bad(f"{spec!r}: the {what} {text!r} is not a number") from None
        strength, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):])[:3]
        if not strength >= 0:
            raise _bad(f"{spec!r}: the strength must be >= 0")
        if not 0.0 <= start < end <= 1.0:
            raise _bad(f"{spec!r}: start and end must satisfy 0 <= start < end <= 1 (shares of the steps)")
        out.append(ControlSpec(kind, open_image(Path(parts[1]), f"{spec!r}: image", "--control"), strength, start, end))
    return out


def parse_control_models(items: list[str] | None) -> dict[str, str]:
    """``TYPE=FILE_OR_NAME`` items as {type: file or name}."""
    out: dict[str, str] = {}
    for item in items or ():
        kind, sep, target = item.partition("=")
        kind = kind.strip().lower()
        if not sep or not target.strip():
            raise _bad(f"{item!r}: expected TYPE=FILE_OR_NAME, e.g. canny=control_v11p_sd15_canny", "--control-model")
        if kind not in TYPE_WORDS:
            raise _bad(f"{item!r}: unknown control type {kind!r}; types: {', '.join(TYPE_WORDS)}", "--control-model")
        out[kind] = target.strip()
    return out


def _choose(kind: str, chosen: dict[str, str], folder: Path, fits: Callable[[Path], str | None]) -> Path:
    try:
        return choose_controlnet(kind, folder, fits, chosen.get(kind))
    except ControlChoiceError as exc:
        raise _bad(f"{exc}; pass --control-model {kind}=FILE", "--control-model") from None


def resolve_controls(specs: list[ControlSpec], chosen: dict[str, str], folder: Path, pipe: Pipeline, width: int,
                     height: int) -> tuple[ControlUse, ...]:
    """ControlUses for ``specs`` on the loaded ``pipe``: files chosen, loaded (CheckpointError names a file that is no
    ControlNet or does not fit), control images preprocessed at the render size."""
    from engine.adapters.refs import AdapterFile
    from engine.checkpoint import CheckpointError
    from engine.control_images import prepare_control_image
    from engine.controlnet_loading import controlnet_fit_problem, inspect_controlnet
    from engine.requests import ControlUse  # noqa: F811 - the runtime import of the name typed above

    m = pipe.models

    def fits(path: Path) -> str | None:
        try:
            info = inspect_controlnet(path, pipe.controlnets.allow_pickle)
        except CheckpointError as exc:
            return str(exc).removeprefix(f"{path}: ")
        return controlnet_fit_problem(info, m.unet.config, m.family.label, pipe.vae_factor)

    uses = []
    for spec in specs:
        path = _choose(spec.kind, chosen, folder, fits)
        loaded = pipe.controlnets.load(AdapterFile(path.stem, str(path)))
        try:
            image = prepare_control_image(spec.kind, spec.image, width, height)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        uses.append(ControlUse(AdapterFile(path.stem, str(path), loaded.file.sha256), image, spec.kind, spec.strength,
                               spec.start, spec.end))
    return tuple(uses)

"""Which ControlNet file goes with a control type: the rule ``adforge generate --control`` and brief rows share.

A ControlNet folder holds files named as their makers name them (lllyasviel's ``control_v11p_sd15_canny``,
``controlnet-canny-sdxl-1.0``, T2I and community names). For a type, the candidates are the files whose name carries
one of the type's words (:data:`TYPE_WORDS`: softedge also answers to hed and pidi, pose to openpose), and the one
that fits the model (its family and block widths, decided by the caller's ``fits``) is chosen; none or several is an
error that lists them, and a name given explicitly (a path, or a file name or stem in the folder) wins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["CONTROLNET_SUFFIXES", "ControlChoiceError", "TYPE_WORDS", "choose_controlnet", "controlnet_files",
           "family_name"]

TYPE_WORDS: dict[str, tuple[str, ...]] = {
    "canny": ("canny",), "softedge": ("softedge", "hed", "pidi"), "lineart": ("lineart",), "scribble": ("scribble",),
    "depth": ("depth",), "pose": ("openpose", "pose"), "none": (),
}
CONTROLNET_SUFFIXES = frozenset({".safetensors", ".sft", ".pth", ".ckpt", ".pt", ".bin"})
# engine.controlnet_loading's family labels -> the family names the models table records (as for LoRAs).
_FAMILY_NAMES = {"SD 1.x": "sd1", "SD 2.x": "sd2", "SDXL": "sdxl"}


class ControlChoiceError(ValueError):
    """No single ControlNet file for a type; the message lists what was found and how to choose."""


def family_name(label: str) -> str:
    """The models-table family of a ControlNet of family ``label`` ("SD 1.x" -> "sd1")."""
    return _FAMILY_NAMES.get(label, label.lower().replace(" ", ""))


def controlnet_files(folder: Path) -> list[Path]:
    """The model files under ``folder`` (sub-folders too), sorted; none if it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CONTROLNET_SUFFIXES)


def choose_controlnet(kind: str, folder: Path, fits: Callable[[Path], str | None], named: str | None = None) -> Path:
    """The ControlNet file for control type ``kind``: ``named`` (a path, or a file name or stem in ``folder``), or the
    one file in ``folder`` whose name carries the type's word and for which ``fits(path)`` finds no problem.
    ControlChoiceError otherwise."""
    if kind not in TYPE_WORDS:
        raise ControlChoiceError(f"unknown control type {kind!r}; types: {', '.join(TYPE_WORDS)}")
    if named is not None:
        if Path(named).is_file():
            return Path(named)
        found = [p for p in controlnet_files(folder) if named in (p.name, p.stem)]
        if len(found) != 1:
            listed = "none" if not found else ", ".join(str(p) for p in found)
            raise ControlChoiceError(f"{kind}={named}: no single ControlNet file of that name in {folder} (found: {listed})")
        return found[0]
    words = TYPE_WORDS[kind]
    matching = [p for p in controlnet_files(folder) if any(w in p.name.lower() for w in words)] if words else []
    problems = {p: fits(p) for p in matching}
    fitting = [p for p, why in problems.items() if why is None]
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        raise ControlChoiceError(f"several ControlNets for {kind} in {folder}: {', '.join(p.name for p in fitting)}; "
                                 f"name one ({kind}=NAME)")
    unfit = "; ".join(f"{p.name}: {why}" for p, why in problems.items())
    raise ControlChoiceError(f"no ControlNet for {kind} in {folder} (file names containing "
                             f"{' or '.join(words) or 'a type word'} that fit this model){' - ' + unfit if unfit else ''}")

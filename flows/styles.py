"""Brand style presets (``templates/styles.yaml``): what a brief row's ``style`` adds to its prompts.

A preset is text (``positive`` becomes the template's ``{style}``, ``negative`` is appended to the negative prompt)
and, for a brand's own look, adapters: ``loras`` (A1111 tags added to every prompt of the row, whatever its
template), ``trigger`` (the words the LoRA was trained on, put at the front of every prompt) and
``negative_embeddings`` (embedding names appended to the negative prompt, e.g. ``easynegative``). A brand style is
then one line in a brief: ``style = acme``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from flows.template_config import (
    TEMPLATES_DIR,
    TemplatingConfigError,
    check_keys,
    check_name,
    config_text,
    load_section,
)

__all__ = ["PresetLora", "StylePreset", "load_styles"]

# A LoRA or embedding name as the folders hold them: a file stem, without the characters a prompt tag cannot carry.
_ADAPTER_NAME = re.compile(r"[^<>:\n\r\t]{1,200}")


@dataclass(frozen=True)
class PresetLora:
    name: str
    te: float = 1.0
    unet: float = 1.0

    @property
    def tag(self) -> str:
        """The A1111 tag: one number when both strengths agree, else ``te:unet``."""
        weights = f"{self.te:g}" if self.te == self.unet else f"{self.te:g}:{self.unet:g}"
        return f"<lora:{self.name}:{weights}>"


@dataclass(frozen=True)
class StylePreset:
    name: str
    positive: str
    negative: str
    loras: tuple[PresetLora, ...] = ()
    trigger: str = ""
    negative_embeddings: tuple[str, ...] = ()

    def apply(self, prompt: str, negative: str) -> tuple[str, str]:
        """A rendered prompt and negative prompt with the preset's trigger words, LoRA tags and negative
        embeddings added (the text parts, ``positive`` / ``negative``, went in through the template)."""
        if self.trigger and not prompt.lower().startswith(self.trigger.lower()):
            prompt = f"{self.trigger}, {prompt}" if prompt else self.trigger
        tags = " ".join(lora.tag for lora in self.loras if lora.tag not in prompt)
        if tags:
            prompt = f"{prompt} {tags}" if prompt else tags
        extra = [name for name in self.negative_embeddings
                 if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", negative, re.IGNORECASE)]
        if extra:
            negative = ", ".join([negative, *extra]) if negative else ", ".join(extra)
        return prompt, negative


def _strength(file: str, where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -10 <= value <= 10:
        raise TemplatingConfigError(f"{file}: key '{where}': expected a strength between -10 and 10, got {value!r}")
    return float(value)


def _adapter_name(file: str, where: str, value: object) -> str:
    if not isinstance(value, str) or not _ADAPTER_NAME.fullmatch(value.strip()):
        raise TemplatingConfigError(f"{file}: key '{where}': expected a file name without '<', '>' or ':', got {value!r}")
    return value.strip()


def _loras(file: str, where: str, value: object) -> tuple[PresetLora, ...]:
    """``loras``: a list of ``name``, ``"name:0.8"`` or ``{name:, weight: | te:, unet:}``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TemplatingConfigError(f"{file}: key '{where}': expected a list of LoRA names, got {value!r}")
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            name, _, weight = item.partition(":") if ":" in item else (item, "", "")
            try:
                w = float(weight) if weight else 1.0
            except ValueError:
                raise TemplatingConfigError(f"{file}: key '{at}': '{item}' is not NAME or NAME:STRENGTH") from None
            out.append(PresetLora(_adapter_name(file, at, name), _strength(file, at, w), _strength(file, at, w)))
            continue
        entry = check_keys(file, at, item, {"name"}, {"weight", "te", "unet"})
        weight = _strength(file, f"{at}.weight", entry.get("weight", 1.0))
        te = _strength(file, f"{at}.te", entry.get("te", weight))
        out.append(PresetLora(_adapter_name(file, f"{at}.name", entry["name"]), te,
                              _strength(file, f"{at}.unet", entry.get("unet", weight))))
    return tuple(out)


def load_styles(path: str | os.PathLike[str] | None = None) -> dict[str, StylePreset]:
    """Brand style presets by name from ``path`` (default ``templates/styles.yaml``)."""
    path = Path(path) if path is not None else TEMPLATES_DIR / "styles.yaml"
    file = os.fspath(path)
    out: dict[str, StylePreset] = {}
    for name, entry in load_section(path, "styles").items():
        name = check_name(file, "styles", name)
        where = f"styles.{name}"
        entry = check_keys(file, where, entry, set(), {"positive", "negative", "loras", "trigger", "negative_embeddings"})
        positive = config_text(file, f"{where}.positive", entry.get("positive"))
        negative = config_text(file, f"{where}.negative", entry.get("negative"))
        loras = _loras(file, f"{where}.loras", entry.get("loras"))
        trigger = config_text(file, f"{where}.trigger", entry.get("trigger"))
        embeddings = entry.get("negative_embeddings") or []
        if not isinstance(embeddings, list):
            raise TemplatingConfigError(f"{file}: key '{where}.negative_embeddings': expected a list of names, got {embeddings!r}")
        names = tuple(_adapter_name(file, f"{where}.negative_embeddings[{i}]", n) for i, n in enumerate(embeddings))
        if not (positive or negative or loras or trigger or names):
            raise TemplatingConfigError(f"{file}: key '{where}': needs a 'positive' or 'negative' text, 'loras', "
                                        "'trigger' or 'negative_embeddings'")
        out[name] = StylePreset(name=name, positive=positive, negative=negative, loras=loras, trigger=trigger,
                                negative_embeddings=names)
    return out

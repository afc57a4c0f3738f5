"""Brand style presets (``templates/styles.yaml``): text a brief row's ``style`` adds to the prompts."""

from __future__ import annotations

import os
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

__all__ = ["StylePreset", "load_styles"]


@dataclass(frozen=True)
class StylePreset:
    name: str
    positive: str
    negative: str


def load_styles(path: str | os.PathLike[str] | None = None) -> dict[str, StylePreset]:
    """Brand style presets by name from ``path`` (default ``templates/styles.yaml``)."""
    path = Path(path) if path is not None else TEMPLATES_DIR / "styles.yaml"
    file = os.fspath(path)
    out: dict[str, StylePreset] = {}
    for name, entry in load_section(path, "styles").items():
        name = check_name(file, "styles", name)
        where = f"styles.{name}"
        entry = check_keys(file, where, entry, set(), {"positive", "negative"})
        positive = config_text(file, f"{where}.positive", entry.get("positive"))
        negative = config_text(file, f"{where}.negative", entry.get("negative"))
        if not positive and not negative:
            raise TemplatingConfigError(f"{file}: key '{where}': needs a 'positive' or 'negative' text")
        out[name] = StylePreset(name=name, positive=positive, negative=negative)
    return out

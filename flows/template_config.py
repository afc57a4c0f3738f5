"""Reading and checking the YAML files under ``templates/`` (``channels.yaml``, ``styles.yaml``).

Every check raises :class:`TemplatingConfigError` with a message that names the file and the key, so a person
editing the file can find the mistake without reading code.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from flows.brief import normalize_name

__all__ = [
    "TEMPLATES_DIR",
    "TemplatingConfigError",
    "check_keys",
    "check_name",
    "config_text",
    "load_section",
    "positive_int",
]

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


class TemplatingConfigError(ValueError):
    """A bad ``channels.yaml`` / ``styles.yaml``: the message names the file and the key."""


def load_section(path: Path, section: str) -> dict:
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


def check_name(file: str, section: str, name: object) -> str:
    if not isinstance(name, str) or not name or normalize_name(name) != name:
        hint = f" (use '{normalize_name(name)}')" if isinstance(name, str) and normalize_name(name) else ""
        raise TemplatingConfigError(
            f"{file}: key '{section}.{name}': name must be lower case words joined by '_'{hint}"
        )
    return name


def check_keys(file: str, where: str, entry: object, required: set[str], optional: set[str]) -> dict:
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


def positive_int(file: str, where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TemplatingConfigError(f"{file}: key '{where}': expected a positive whole number, got {value!r}")
    return value


def config_text(file: str, where: str, value: object, *, allow_empty: bool = True) -> str:
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise TemplatingConfigError(f"{file}: key '{where}': expected text, got {value!r}")
    return value.strip()

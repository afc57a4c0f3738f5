"""Brand kits written by tests: the example kit's files copied to a temporary templates folder, with YAML edits."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import ROOT

ACME = ROOT / "templates" / "brands"


def kit_folder(tmp: Path, yaml_text: str | None = None, name: str = "acme") -> Path:
    """A templates folder under ``tmp`` whose brands/ holds the example kit's files and ``<name>.yaml`` (the
    example's text, or ``yaml_text``). Returns the templates folder."""
    templates = tmp / "templates"
    brands = templates / "brands"
    brands.mkdir(parents=True, exist_ok=True)
    if not (brands / "acme").exists():
        shutil.copytree(ACME / "acme", brands / "acme")
    (brands / f"{name}.yaml").write_text(yaml_text if yaml_text is not None else (ACME / "acme.yaml").read_text(),
                                         encoding="utf-8")
    return templates


def acme_text() -> str:
    return (ACME / "acme.yaml").read_text(encoding="utf-8")

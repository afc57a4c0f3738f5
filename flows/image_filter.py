"""The image filter: every delivered picture through the Stable Diffusion safety checker (:mod:`engine.safety_checker`).

The weights are the user's (the ``safety_checker`` setting, see :func:`resolve_setting`); without them the filter is
off and the run summary says so. nudenet is not used: its wheel's licence files are AGPL-3.0.

A flagged asset is still stored and recorded (``assets.flagged``, the findings in ``assets.flags``), then kept from
export and every file route until an admin releases it (:mod:`storage.releases`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from flows.trust import Finding, ImageCheck

if TYPE_CHECKING:
    from engine.safety_checker import SafetyChecker
    from storage.database import Database

__all__ = ["DEFAULT_DIR", "DETECTOR", "SafetyCheckerStep", "count_flagged", "image_filter_from_settings",
           "image_filter_label", "resolve_setting"]

DETECTOR = "sd-safety-checker"
DEFAULT_DIR = Path("models") / "safety_checker"  # under where adforge runs
OFF = ("off", "none", "false", "no", "")

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], tuple["SafetyChecker", str, threading.Lock]] = {}


def resolve_setting(value: str | None, base: Path) -> str:
    """The setting as runs record it: an absolute path to the checker's folder or weights file, or "" (off).
    None means ``models/safety_checker`` under ``base`` when that exists, else off. Raises ValueError (one line)
    when a named checker lacks its files."""
    if value is None:
        default = base / DEFAULT_DIR
        if not default.exists():
            return ""
        value = os.fspath(default)
    if value.strip().lower() in OFF:
        return ""
    from engine.safety_checker import checker_files  # torch and transformers only when a checker is configured

    path = (base / value).resolve()
    checker_files(path)
    return path.as_posix()


def _weights_sha256(path: str) -> str:
    from engine.checkpoint import file_sha256
    from engine.safety_checker import checker_files

    return file_sha256(checker_files(path)[1])


def image_filter_label(setting: str | None) -> str:
    """What the run summary says of the filter: ``sd-safety-checker <10 hex of the weights' sha256>``, "" when off."""
    return f"{DETECTOR} {_weights_sha256(setting)[:10]}" if setting else ""


def _device(setting: str) -> str:
    """The render device when it is a GPU this process sees (a device worker sees its one GPU as ``cuda``)."""
    import torch

    if setting == "cpu" or not torch.cuda.is_available():
        return "cpu"
    if setting.startswith("cuda:") and setting[5:].isdigit() and int(setting[5:]) < torch.cuda.device_count():
        return setting
    return "cuda"


def _load(path: str, device: str) -> tuple["SafetyChecker", str, threading.Lock]:
    """The checker, its weights' sha256 and a lock, loaded once per process, path and device."""
    import torch

    from engine.safety_checker import load_safety_checker

    with _LOCK:
        entry = _LOADED.get((path, device))
        if entry is None:
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            entry = (load_safety_checker(path, device=device, dtype=dtype), _weights_sha256(path), threading.Lock())
            _LOADED[(path, device)] = entry
        return entry


class SafetyCheckerStep:
    def __init__(self, path: str, device: str = "cpu") -> None:
        self.path = path
        self.checker, self.sha256, self._lock = _load(path, device)

    def check(self, images: list[Image.Image]) -> list[Finding]:
        with self._lock:  # delivery threads of one process share the loaded checker
            verdicts = self.checker.check(images)
        return [Finding(v.flagged, json.dumps({
            "detector": DETECTOR, "hash": self.sha256[:10], "sha256": self.sha256, "concepts": v.concepts,
            "special_care": [i for i, s in enumerate(v.special_scores) if s > 0], "max_score": round(v.max_score, 4),
        })) for v in verdicts]


def image_filter_from_settings(settings: Mapping[str, Any]) -> ImageCheck | None:
    """The run's filter from its recorded settings (already resolved by ``load_settings``); None when off. A run
    recorded before the setting existed has no key: off, as it was."""
    path = settings.get("safety_checker") or ""
    if not path:
        return None
    return SafetyCheckerStep(path, _device(str(settings.get("device") or "auto")))


def count_flagged(db: Database, run_id: int) -> int:
    """Assets this run stored that the filter flagged (the count of a fanned-out run comes from the database)."""
    from sqlalchemy import func, select

    from storage.schema import Asset

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Asset).where(Asset.run_id == run_id, Asset.flagged.is_(True))) or 0

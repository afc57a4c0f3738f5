"""What a request says about its adapters: which LoRA files at which strengths, which embedding files.

These are plain values shared by the prompt parser, the folder library, the pipeline and the callers above the
engine (which pin files by sha256 in their records). Reading and applying the files lives beside this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class AdapterError(ValueError):
    """An adapter that cannot be used, with the file (and key, where one is to blame) in the message."""

    def __init__(self, path: str | os.PathLike[str] | None, message: str, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        shown = key if key is None or len(key) <= 200 else key[:200] + "..."
        where = "" if path is None else f"{self.path}" + (f" [key {shown!r}]" if key else "") + ": "
        super().__init__(f"{where}{message}")


@dataclass(frozen=True)
class AdapterFile:
    """One LoRA or embedding file. ``name`` is what prompts call it (the file stem); ``sha256``, when given, is
    checked before the file is used, so a request renders with exactly the file its caller recorded."""

    name: str
    path: str
    sha256: str | None = None

    @property
    def short_hash(self) -> str:
        """A1111's ``Lora hashes`` / ``TI hashes`` form: the first 12 hex characters of the file's sha256."""
        return (self.sha256 or "")[:12]


@dataclass(frozen=True)
class LoraUse:
    """A LoRA at its strengths: ``te`` for the text-encoder modules, ``unet`` for the U-Net's (A1111's
    ``<lora:name:te:unet>``; one number sets both)."""

    file: AdapterFile
    te: float = 1.0
    unet: float = 1.0

    @property
    def key(self) -> tuple:
        """What makes two uses the same merge: the file's identity and both strengths."""
        return (self.file.sha256 or os.path.abspath(self.file.path), self.te, self.unet)

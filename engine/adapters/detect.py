"""Telling a LoRA or a textual-inversion embedding file from anything else, by its keys first and weights-only:
what ``adforge models inspect`` shows and what the model registry records."""

from __future__ import annotations

import os
from pathlib import Path

from engine.adapters.embeddings import EmbeddingInfo, describe_embedding
from engine.adapters.lora_file import LoraInfo, describe_lora, is_lora_file
from engine.adapters.refs import AdapterError

__all__ = ["EMBEDDING_MAX_BYTES", "embedding_family", "inspect_adapter"]

# Embeddings are a few KB; a bigger file is not read as one (it would be a checkpoint or an upscaler).
EMBEDDING_MAX_BYTES = 16 * 1024 * 1024


def inspect_adapter(path: str | os.PathLike[str]) -> LoraInfo | EmbeddingInfo | None:
    """The file described as a LoRA or an embedding, or None if it is neither. A file whose keys are a LoRA's but
    that cannot be read as one raises AdapterError (naming the file and key)."""
    p = Path(path)
    try:
        lora = is_lora_file(p)
    except AdapterError:
        lora = False  # not even openable as one: whatever reads it next says what it is
    if lora:
        return describe_lora(p)
    if p.stat().st_size > EMBEDDING_MAX_BYTES:
        return None
    try:
        return describe_embedding(p)
    except AdapterError:
        return None


def embedding_family(info: EmbeddingInfo) -> str:
    """The family row an embedding is for: SDXL's two-part files, SD 2.x's 1024-wide vectors, else SD 1.x."""
    if info.format == "sdxl":
        return "sdxl"
    return "sd2" if info.width == 1024 else "sd1"

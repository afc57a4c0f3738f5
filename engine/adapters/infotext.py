"""A request's adapters as A1111 writes them into infotext, and the check that its prompt tags and files agree."""

from __future__ import annotations

import json
from collections.abc import Sequence

from engine.adapters.prompt_tags import parse_lora_tags
from engine.adapters.refs import AdapterError, AdapterFile, LoraUse

__all__ = ["adapter_parameters", "check_lora_tags"]


def check_lora_tags(prompt: str, negative: str, loras: Sequence[LoraUse]) -> None:
    """Every ``<lora:...>`` tag of the prompts names one of ``loras`` at its strengths: a tag without its file
    would otherwise be dropped silently, and the image would not be what its infotext says."""
    given = {use.file.name: use for use in loras}
    for text in (prompt, negative):
        for tag in parse_lora_tags(text)[1]:
            use = given.get(tag.name)
            if use is None:
                raise AdapterError(None, f"the prompt names LoRA '{tag.name}' but the request carries no file for it")
            if (use.te, use.unet) != (tag.te, tag.unet):
                raise AdapterError(None, f"LoRA '{tag.name}': the prompt says te={tag.te:g} unet={tag.unet:g}, the "
                                         f"request te={use.te:g} unet={use.unet:g}")


def _clean(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def adapter_parameters(loras: Sequence[LoraUse], embeddings: Sequence[AdapterFile], model_hash: str) -> dict[str, str]:
    """``Lora hashes`` / ``TI hashes`` ("name: first 12 hex of the file's sha256", names without ':' or ',', as
    A1111 writes them) and ``Hashes``, the JSON object Civitai reads (10-hex AutoV2 hashes, ``lora:`` / ``embed:``
    keys)."""
    p: dict[str, str] = {}
    if loras:
        p["Lora hashes"] = ", ".join(f"{_clean(u.file.name)}: {u.file.short_hash}" for u in loras if u.file.sha256)
    if embeddings:
        p["TI hashes"] = ", ".join(f"{_clean(f.name)}: {f.short_hash}" for f in embeddings if f.sha256)
    if loras or embeddings:
        hashes = {"model": model_hash}
        hashes.update({f"lora:{u.file.name}": (u.file.sha256 or "")[:10] for u in loras if u.file.sha256})
        hashes.update({f"embed:{f.name}": (f.sha256 or "")[:10] for f in embeddings if f.sha256})
        p["Hashes"] = json.dumps(hashes, ensure_ascii=False)
    return {k: v for k, v in p.items() if v}

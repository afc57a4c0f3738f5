"""A trained embedding as a file every loader reads: A1111's ``.pt`` or a kohya-style ``.safetensors``.

* ``.pt``: exactly the dict A1111's ``Embedding.save`` writes (``string_to_token`` {"*": 265}, ``string_to_param``
  {"*": [n, width]}, ``name``, ``step``, ``sd_checkpoint`` = the base model's short hash (first 10 hex of its sha256,
  A1111's ``shorthash``), ``sd_checkpoint_name`` = its name). No extra keys: readers that check the layout by its
  keys (and A1111's own preview) see a file like any other. It is a pickle: offer ``.safetensors`` where files leave
  the house.
* ``.safetensors``: ``{"emb_params": [n, width]}`` (kohya's layout, read by A1111, ComfyUI, diffusers and
  :mod:`engine.adapters.embeddings`) with string metadata: ``adforge.*`` for the audit trail (image set and base model
  sha256, the licence the caller says applies, the training settings) and Stability's ``modelspec.*`` header.

Prompts call an embedding by its file's name, so the file must be named after the trained token.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.training.embedding_trainer import EmbeddingTrainingConfig, EmbeddingTrainingResult
from engine.training.image_set import ImageSet

A1111_TOKEN_ID = 265  # what A1111 has always written in string_to_token; nothing reads it back
_ARCHITECTURE = {("sd1", "eps"): "stable-diffusion-v1", ("sd1", "v"): "stable-diffusion-v1",
                 ("sd2", "eps"): "stable-diffusion-v2-512", ("sd2", "v"): "stable-diffusion-v2-768-v"}


def a1111_dict(result: EmbeddingTrainingResult, models) -> dict:
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": result.vectors.detach().to("cpu", torch.float32).contiguous()},
        "name": result.token,
        "step": result.steps,
        "sd_checkpoint": models.checkpoint.sha256[:10],
        "sd_checkpoint_name": models.checkpoint.path.stem,
    }


def embedding_metadata(result: EmbeddingTrainingResult, models, image_set: ImageSet, config: EmbeddingTrainingConfig,
                       *, licence: str | None = None) -> dict[str, str]:
    family = models.family.name.removesuffix("-inpaint")
    meta = {
        "adforge.kind": "textual-inversion",
        "adforge.token": result.token,
        "adforge.vectors": str(int(result.vectors.shape[0])),
        "adforge.init_text": result.init_text,
        "adforge.steps": str(result.steps),
        "adforge.image_set_sha256": image_set.sha256,
        "adforge.image_count": str(len(image_set.items)),
        "adforge.trigger": image_set.trigger,
        "adforge.class_word": image_set.class_word,
        "adforge.base_model_sha256": models.checkpoint.sha256,
        "adforge.base_model_name": models.checkpoint.path.name,
        "adforge.training": json.dumps({**asdict(config), "resolution": result.resolution}, sort_keys=True),
        "adforge.training_fingerprint": result.fingerprint,
        "adforge.final_loss": str(result.losses[-1]) if result.losses else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCHITECTURE.get((family, models.prediction), family)}/textual-inversion",
        "modelspec.title": result.token,
        "modelspec.resolution": f"{result.resolution}x{result.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(result.finished_at)),
    }
    if licence:
        meta["adforge.licence"] = licence
        meta["modelspec.license"] = licence
    return meta


def export_embedding(
    path: str | os.PathLike[str], result: EmbeddingTrainingResult, models, image_set: ImageSet,
    config: EmbeddingTrainingConfig, *, licence: str | None = None, metadata: dict[str, str] | None = None,
) -> Path:
    """Write the embedding to ``path``; the suffix picks the format (``.pt``: A1111, ``.safetensors``: emb_params +
    metadata, with ``metadata`` added over ours). Written beside it, then renamed: a crash never leaves half a
    file."""
    out = Path(path)
    if out.stem != result.token:
        raise ValueError(f"{out.name}: prompts call an embedding by its file name, so this one must be named "
                         f"{result.token}{out.suffix or '.safetensors'}")
    suffix = out.suffix.lower()
    tmp = out.with_name(out.name + ".part")
    if suffix == ".pt":
        torch.save(a1111_dict(result, models), tmp)
    elif suffix == ".safetensors":
        save_file({"emb_params": result.vectors.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                  metadata={**embedding_metadata(result, models, image_set, config, licence=licence), **(metadata or {})})
    else:
        raise ValueError(f"{out.name}: unknown embedding format {out.suffix!r}; use .pt (A1111) or .safetensors")
    os.replace(tmp, out)
    return out

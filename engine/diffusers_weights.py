"""Which weights file(s) of a diffusers component folder to read: plain, variant (``fp16``...), sharded or pickled.

A component folder (``unet/``, ``vae/``, ``text_encoder/``...) holds its weights under names diffusers and
transformers write (``save_pretrained``):

- one file: ``diffusion_pytorch_model.safetensors`` (transformers: ``model.safetensors``);
- shards: ``diffusion_pytorch_model.safetensors.index.json`` whose ``weight_map`` names, per tensor, the shard file
  in the same folder;
- a variant: ``diffusion_pytorch_model.fp16.safetensors``, ``diffusion_pytorch_model.safetensors.index.fp16.json``
  (the ``.fp16`` goes before the last suffix of either name);
- pickles: the same with ``.bin`` (transformers: ``pytorch_model.bin``), read only with ``allow_pickle``
  (weights-only unpickling, as single files).

Choice, ``variant`` None: the full-precision file (one file, else shards) first, as diffusers does without a variant;
else the folder's only variant (a folder with several variants and no plain file must be told which). ``variant``
named: that variant, else as for None (diffusers too falls back per component, e.g. a VAE without fp16 files).
safetensors always win over pickles, which are read only where nothing else is there. The entry's ``files`` (the
index and every shard) are what the folder hash covers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, StateDict, open_state_dict

# component -> (safetensors stem, pickle stem)
STEMS = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
         "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
         "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}
_VARIANT = re.compile(r"[A-Za-z0-9_]+")  # no '-' or '.': a shard ("x.fp16-00001-of-00002.safetensors") is no variant


@dataclass(frozen=True)
class Weights:
    """A component's chosen weights: the file the tensors are read through (a weights file or a shard index), every
    file read, and the tensors."""

    entry: Path
    files: list[Path]
    tensors: StateDict


class ShardedStateDict(StateDict):
    """The tensors of a shard index: each name read from the shard ``weight_map`` gives it (opened lazily by
    :func:`open_state_dict`, so safetensors shards stay memory-mapped)."""

    def __init__(self, index: Path, owner: dict[str, StateDict]):
        super().__init__(index, {})
        self._owner = owner
        self._keys = list(owner)
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._key_set:
            raise KeyError(key)
        return self._owner[key].shape(key)


def read_json(path: Path, what: str) -> dict:
    """A JSON object file; CheckpointError naming it otherwise."""
    if not path.is_file():
        raise CheckpointError(path, f"missing {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"cannot be read as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, "is not a JSON object")
    return value


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last suffix (``x.safetensors.index.json`` -> ``...index.fp16.json``)."""
    if variant is None:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.{variant}.{last}"


def _candidates(stem: str, suffix: str, variant: str | None) -> list[str]:
    return [_with_variant(f"{stem}.{suffix}", variant), _with_variant(f"{stem}.{suffix}.index.json", variant)]


def variants_present(folder: Path, component: str) -> list[str]:
    """The variants (``fp16``...) the component folder has weights for, sorted."""
    found: set[str] = set()
    for stem, suffix in zip(STEMS[component], ("safetensors", "bin")):
        single = re.compile(rf"{re.escape(stem)}\.({_VARIANT.pattern})\.{suffix}")
        index = re.compile(rf"{re.escape(stem)}\.{suffix}\.index\.({_VARIANT.pattern})\.json")
        for path in folder.iterdir() if folder.is_dir() else ():
            if m := single.fullmatch(path.name) or index.fullmatch(path.name):
                found.add(m.group(1))
    return sorted(found)


def _first(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def choose_weights(folder: Path, component: str, variant: str | None = None, allow_pickle: bool = False) -> Path:
    """The weights file or shard index to read for ``component`` (see the module doc); CheckpointError otherwise,
    naming the plain file that is missing."""
    safe_stem, pickle_stem = STEMS[component]
    wanted = folder / f"{safe_stem}.safetensors"
    if variant is not None and not _VARIANT.fullmatch(variant):
        raise CheckpointError(folder, f"variant {variant!r} is not a variant name (such as fp16)")
    present = variants_present(folder, component)
    # several variants and no plain file: refused below, naming them
    order: list[str | None] = [None, *(present if len(present) == 1 else [])]
    if variant is not None:
        order = [variant, *order]
    for suffix, stem in (("safetensors", safe_stem), ("bin", pickle_stem)):
        for v in order:
            found = _first(folder, _candidates(stem, suffix, v))
            if found is None:
                continue
            if suffix == "bin" and not allow_pickle:
                raise CheckpointError(wanted, f"missing {component} weights: only {found.name} is there, a Python pickle "
                                              "(loading one can run code); --allow-pickle reads it with weights-only "
                                              "unpickling, or convert it to .safetensors")
            return found
    asked = f" (variant {variant!r} asked for)" if variant else ""
    if len(present) > 1:
        raise CheckpointError(wanted, f"missing {component} weights{asked}: {folder.name}/ has the variants "
                                      f"{', '.join(present)} but no full-precision file; name the variant to read")
    raise CheckpointError(wanted, f"missing {component} weights{asked}: no {wanted.name}, no shard index "
                                  f"{wanted.name}.index.json, no variant of them")


def _shards(index_file: Path, allow_pickle: bool) -> tuple[list[Path], ShardedStateDict]:
    index = read_json(index_file, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index_file, "no weight_map (tensor name -> shard file) in the shard index", "weight_map")
    opened: dict[str, StateDict] = {}
    owner: dict[str, StateDict] = {}
    for key, shard in weight_map.items():
        # A shard is a file next to the index: a name with a folder in it could read any file on the machine.
        if not isinstance(shard, str) or Path(shard).name != shard or shard.startswith("."):
            raise CheckpointError(index_file, f"shard {shard!r} is not a file name in the index's folder", str(key))
        if shard not in opened:
            path = index_file.parent / shard
            if not path.is_file():
                raise CheckpointError(path, f"missing shard (named in {index_file.name})", str(key))
            opened[shard] = open_state_dict(path, allow_pickle)
        if key not in opened[shard]:
            raise CheckpointError(index_file.parent / shard, f"tensor missing from the shard ({index_file.name} puts it "
                                                             "there)", str(key))
        owner[key] = opened[shard]
    return sorted(index_file.parent / s for s in opened), ShardedStateDict(index_file, owner)


def open_weights(folder: Path, component: str, variant: str | None = None, allow_pickle: bool = False) -> Weights:
    """The component's tensors from the file :func:`choose_weights` picks (one file, or every shard of an index)."""
    entry = choose_weights(folder, component, variant, allow_pickle)
    if entry.name.endswith(".json"):
        shard_files, tensors = _shards(entry, allow_pickle)
        return Weights(entry, [entry, *shard_files], tensors)
    return Weights(entry, [entry], open_state_dict(entry, allow_pickle))

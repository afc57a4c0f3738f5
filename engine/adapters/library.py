"""Folders of LoRA and embedding files, and which of them a prompt asks for.

As in A1111, a LoRA is called by its file stem in a ``<lora:stem:...>`` tag and an embedding by its file stem
written as a word of the prompt; both folders are searched with their subfolders (A1111 walks them too), hidden
files and folders skipped. A stem is matched exactly first, then ignoring case (embeddings always match in any
case: CLIP lower-cases the prompt). One name must mean one file: two files with the same stem (``x.pt`` beside a
converted ``x.safetensors``, or in two subfolders) are an error naming both, never a silent pick, because the
record of a render says which file it used.

Listing folders is cheap and done on every call, so files added while a worker runs are seen. Files are only
hashed (sha256, cached by engine.checkpoint) once a prompt uses them, and never read here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.adapters.prompt_tags import combine_lora_tags, parse_lora_tags
from engine.adapters.refs import AdapterError, AdapterFile, LoraUse
from engine.checkpoint import file_sha256
from engine.conditioning import embeddings_named_in
from engine.tokenizer import ClipTokenizer

LORA_SUFFIXES = frozenset({".safetensors", ".pt", ".ckpt", ".bin"})
EMBEDDING_SUFFIXES = frozenset({".pt", ".bin", ".safetensors"})


@dataclass(frozen=True)
class ResolvedAdapters:
    """The adapter files a prompt pair needs, hashed: LoRAs in order of first appearance (prompt, then negative),
    embeddings in order of first use."""

    loras: tuple[LoraUse, ...] = ()
    embeddings: tuple[AdapterFile, ...] = ()


@dataclass(frozen=True)
class AdapterListing:
    """Every file the library's folders hold, unhashed (for ``adforge models list``)."""

    loras: tuple[AdapterFile, ...]
    embeddings: tuple[AdapterFile, ...]


def _scan(dirs: Sequence[Path], suffixes: frozenset[str]) -> dict[str, list[Path]]:
    """stem -> files, over the folders and their subfolders."""
    index: dict[str, list[Path]] = {}
    seen: set[str] = set()
    for root in dirs:
        if not root.is_dir():
            continue
        for here, subdirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(here)
            if real in seen:  # a symlink loop, or one folder reachable twice
                subdirs[:] = []
                continue
            seen.add(real)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(here) / name
                if not name.startswith(".") and path.suffix.lower() in suffixes and path.is_file():
                    index.setdefault(path.stem, []).append(path)
    return index


def _folders(dirs: Sequence[Path]) -> str:
    if not dirs:
        return "no folder (none is configured)"
    return ", ".join(str(d) + ("" if d.is_dir() else " (folder does not exist)") for d in dirs)


def _pick(kind: str, index: dict[str, list[Path]], dirs: Sequence[Path], name: str) -> Path:
    candidates = index.get(name) or [p for stem, ps in index.items() if stem.casefold() == name.casefold() for p in ps]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        listed = ", ".join(str(p) for p in candidates)
        raise AdapterError(None, f"{kind} {name!r} matches {len(candidates)} files ({listed}); keep one, or rename it")
    by_folded: dict[str, list[str]] = {}
    for stem in index:
        by_folded.setdefault(stem.casefold(), []).append(stem)
    close = [s for f in difflib.get_close_matches(name.casefold(), list(by_folded), n=5, cutoff=0.6) for s in by_folded[f]]
    hint = f"; did you mean {', '.join(repr(s) for s in close)}?" if close else ""
    raise AdapterError(None, f"no {kind} named {name!r} in {_folders(dirs)}{hint}")


def _hashed(path: Path) -> AdapterFile:
    return AdapterFile(name=path.stem, path=str(path), sha256=file_sha256(path))


class AdapterLibrary:
    """LoRA and embedding files found by name in configured folders."""

    def __init__(self, lora_dirs: Sequence[str | os.PathLike[str]], embedding_dirs: Sequence[str | os.PathLike[str]]):
        self.lora_dirs = tuple(Path(d) for d in lora_dirs)
        self.embedding_dirs = tuple(Path(d) for d in embedding_dirs)

    def lora(self, name: str) -> AdapterFile:
        """The LoRA file called ``name`` (its stem), hashed."""
        return _hashed(_pick("LoRA", _scan(self.lora_dirs, LORA_SUFFIXES), self.lora_dirs, name))

    def embedding(self, name: str) -> AdapterFile:
        """The embedding file called ``name`` (its stem), hashed."""
        return _hashed(_pick("embedding", _scan(self.embedding_dirs, EMBEDDING_SUFFIXES), self.embedding_dirs, name))

    def resolve(self, prompt: str, negative: str, tokenizer: ClipTokenizer) -> ResolvedAdapters:
        """The LoRAs tagged and the embeddings named in a prompt and its negative; only those files are hashed."""
        tags = combine_lora_tags(parse_lora_tags(prompt)[1], parse_lora_tags(negative)[1])
        uses: dict[Path, LoraUse] = {}
        if tags:
            index = _scan(self.lora_dirs, LORA_SUFFIXES)
            for tag in tags:
                path = _pick("LoRA", index, self.lora_dirs, tag.name)
                use = uses.get(path)
                if use is None:
                    uses[path] = LoraUse(_hashed(path), tag.te, tag.unet)
                elif (use.te, use.unet) != (tag.te, tag.unet):
                    raise AdapterError(None, f"{tag.shown} names the same LoRA file ({path}) as another tag at "
                                             "different strengths; use one tag")
        embeddings: list[AdapterFile] = []
        index = _scan(self.embedding_dirs, EMBEDDING_SUFFIXES)
        if index:
            used = embeddings_named_in(prompt, index, tokenizer)
            used += [n for n in embeddings_named_in(negative, index, tokenizer) if n not in used]
            embeddings = [_hashed(_pick("embedding", index, self.embedding_dirs, name)) for name in used]
        return ResolvedAdapters(tuple(uses.values()), tuple(embeddings))

    def list_files(self) -> AdapterListing:
        """Every LoRA and embedding file in the folders, sorted by name; nothing is hashed or read."""

        def files(index: dict[str, list[Path]]) -> tuple[AdapterFile, ...]:
            return tuple(AdapterFile(stem, str(p)) for stem in sorted(index, key=str.casefold) for p in index[stem])

        return AdapterListing(
            files(_scan(self.lora_dirs, LORA_SUFFIXES)), files(_scan(self.embedding_dirs, EMBEDDING_SUFFIXES))
        )

"""Build the shipped CLIP tokenizer files ``vocab.json`` and ``merges.txt``.

This is a developer script, never imported at run time: the engine only reads
the two generated files that sit next to it (they are package data).

Where the data comes from
-------------------------
* Package: ``open_clip_torch`` 3.3.0 from PyPI, file
  ``open_clip_torch-3.3.0-py3-none-any.whl``
  (sha256 ``c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce``), obtained with::

      pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc

* Member: ``open_clip/bpe_simple_vocab_16e6.txt.gz``
  (sha256 ``924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a``).
  This is OpenAI CLIP's byte-level BPE merges list, the same file OpenAI
  published with CLIP (github.com/openai/CLIP, ``clip/bpe_simple_vocab_16e6.txt.gz``).
* Licence: the vocabulary is OpenAI CLIP's, released under the MIT licence
  (Copyright (c) 2021 OpenAI); open_clip_torch, which redistributes it, is
  MIT-licensed as well. Both permit redistribution inside this package.

What is built (CLIP's own construction, which ``transformers.CLIPTokenizer``
reproduces when given these files)
-------------------------------------------------------------------------
vocab ids, in order:

1. the 256 byte-to-unicode characters (GPT-2 / CLIP byte-level mapping, in the
   mapping's own order: printable bytes first, then the remapped ones);
2. the same 256 characters with ``</w>`` appended (end-of-word forms);
3. one token per merge, the pair joined, for lines 1 .. 48894 of the merges
   file (line 0 is a ``#version`` header);
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

That is 49408 ids. ``merges.txt`` holds the same 48894 merges after a
``#version: 0.2`` header line, the format the Hugging Face BPE loaders expect.

Re-running
----------
From the repository root::

    .venv/bin/python engine/tokenizer_data/build_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
    # or, given the extracted member:
    .venv/bin/python engine/tokenizer_data/build_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz

The output is deterministic: re-running on the same input reproduces the
committed files byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps only the first 49152 - 256 - 2 merges of the file (its vocab size is
# fixed at 49408 = 2 * 256 byte tokens + merges + 2 specials).
N_MERGES = 49152 - 256 - 2  # 48894
VOCAB_SIZE = 49408
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
OUT_DIR = Path(__file__).resolve().parent


def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> printable unicode character, the GPT-2/CLIP byte-level mapping.

    Printable Latin-1 bytes map to themselves; the others (control chars, space,
    a few gaps) are shifted to code points 256+ so every byte has a visible,
    non-whitespace stand-in that BPE can treat as an ordinary character. The
    dict's insertion order (printable first) is the vocabulary order CLIP uses.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def read_merges_gz(source: Path) -> bytes:
    """Return the gzipped merges file, from the wheel or from the .gz itself."""
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            return wheel.read(WHEEL_MEMBER)
    return source.read_bytes()


def build(gz_bytes: bytes) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merge lines ("a b") in rank order."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    # Line 0 is the header; CLIP takes exactly lines 1 .. N_MERGES.
    merges = lines[1 : N_MERGES + 1]
    if len(merges) != N_MERGES:
        raise ValueError(f"expected {N_MERGES} merges, file has {len(merges)}")
    pairs = []
    for line in merges:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"malformed merge line {line!r}")
        pairs.append((parts[0], parts[1]))

    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in pairs] + list(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # A duplicate token would silently shift ids (CLIP's dict keeps the last id);
    # the real file has none, and we insist on it so the ids stay CLIP's.
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"vocab has {len(vocab)} unique / {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return vocab, [f"{a} {b}" for a, b in pairs]


def write(vocab: dict[str, int], merges: list[str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False keeps the byte-level characters readable and the file
    # smaller; sort by id so diffs of a rebuilt file are meaningful.
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out_dir / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    vocab, merges = build(read_merges_gz(args.source))
    write(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

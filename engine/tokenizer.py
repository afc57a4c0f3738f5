"""CLIP's byte-level BPE tokenizer, from vocabulary files shipped in this package.

The files under ``engine/tokenizer_data/`` are OpenAI CLIP's vocabulary (see
``engine/tokenizer_data/build_vocab.py`` for provenance and licence); nothing is
ever fetched from a model hub.

``encode`` returns bare token ids (no BOS/EOS, no truncation) because the
prompt-weighting code splits long prompts into 75-token chunks itself and
wraps each chunk as BOS + 75 (EOS-padded) + EOS = 77 tokens.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

from transformers import CLIPTokenizer

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>, also CLIP's padding token
MAX_LENGTH = 77  # CLIP text encoder's context length: BOS + 75 + EOS
CHUNK_TOKENS = 75  # content tokens per 77-token chunk

_DATA_DIR = Path(__file__).resolve().parent / "tokenizer_data"
_VOCAB_FILE = _DATA_DIR / "vocab.json"
_MERGES_FILE = _DATA_DIR / "merges.txt"
_EXPECTED_VOCAB_SIZE = 49408
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


class ClipTokenizer:
    """Thin wrapper over ``transformers.CLIPTokenizer`` with the engine's contract.

    The wrapper exists so the rest of the engine depends on three methods, not on
    transformers' tokenizer API, which changed substantially between 4.x and 5.x.
    """

    def __init__(self, hf_tokenizer: CLIPTokenizer) -> None:
        self._hf = hf_tokenizer
        # Encode through the `tokenizers` backend directly: it applies CLIP's
        # normalisation (NFC, whitespace collapse, lower-case), pre-split and BPE,
        # and skips transformers' per-call wrapper (padding/truncation settings,
        # length warnings) that we neither want nor need per chunk.
        self._backend = hf_tokenizer.backend_tokenizer
        size = self._backend.get_vocab_size(with_added_tokens=True)
        # transformers 5's CLIPTokenizer silently builds a 3-token vocabulary when
        # given file paths it does not read (e.g. vocab_file=/merges_file=); every
        # word then maps to <|endoftext|>. Fail loudly instead of producing that.
        if size != _EXPECTED_VOCAB_SIZE:
            raise ValueError(f"CLIP tokenizer has {size} tokens, expected {_EXPECTED_VOCAB_SIZE}")
        if (self._hf.bos_token_id, self._hf.eos_token_id, self._hf.pad_token_id) != (BOS_ID, EOS_ID, EOS_ID):
            raise ValueError("CLIP tokenizer special tokens do not have CLIP's ids")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        # CLIP normalises with NFC then Python's str.lower(). The backend's
        # Lowercase normaliser works char by char and so misses context-dependent
        # rules (a word-final capital sigma must become "ς", not "σ"); doing
        # CLIP's own steps first makes the backend's pass a no-op. It also lets an
        # upper-cased "<|ENDOFTEXT|>" match the special token, as it does in CLIP.
        normalised = unicodedata.normalize("NFC", text).lower()
        return list(self._backend.encode(normalised, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; BOS/EOS (and so EOS padding) are dropped.

        CLIP's normalisation is lossy (lower-case, collapsed whitespace), so this
        is the normalised prompt, not necessarily the text that was encoded.
        """
        return self._hf.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            # The "#version: 0.2" header (and any blank trailing line) is not a merge.
            if not line or line.startswith("#version"):
                continue
            first, second = line.split(" ")
            merges.append((first, second))
    return merges


@functools.cache
def load_clip_tokenizer() -> ClipTokenizer:
    """The shipped CLIP tokenizer; built once per process (about 0.3 s).

    The vocabulary and merges are read here and handed to ``CLIPTokenizer`` as
    objects: in transformers 5 the constructor ignores ``vocab_file=``/``merges_file=``
    (only ``from_pretrained`` reads files), and ``from_pretrained`` is avoided so no
    hub-resolution code path is ever involved.
    """
    with _VOCAB_FILE.open(encoding="utf-8") as fh:
        vocab: dict[str, int] = json.load(fh)
    hf = CLIPTokenizer(
        vocab=vocab,
        merges=_read_merges(_MERGES_FILE),
        unk_token=_EOS,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,  # CLIP pads with <|endoftext|>, not with a separate pad id
        model_max_length=MAX_LENGTH,
    )
    return ClipTokenizer(hf)

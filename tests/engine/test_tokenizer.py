"""The shipped CLIP tokenizer gives CLIP's real ids.

Besides the known ids from DESIGN.md, the ids are checked against a small
reference byte-level BPE written here from CLIP's published algorithm, reading
the same vocab.json / merges.txt: an independent check of both the files and
transformers' handling of them.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import pytest

from engine import tokenizer as tk
from engine.tokenizer import BOS_ID, CHUNK_TOKENS, EOS_ID, MAX_LENGTH, ClipTokenizer, load_clip_tokenizer

regex = pytest.importorskip("regex")  # transformers depends on it; needed for \p{L} / \p{N}

DATA_DIR = Path(tk.__file__).resolve().parent / "tokenizer_data"

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "  leading and trailing   spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp and\u3000ideographic space",
    "masterpiece, best quality, (highly detailed:1.2), 8k, RAW photo!!!",
    "numbers 1234567890 and 3.14159 and -42 and 1,000,000",
    "punctuation: ;;; ... --- ??? !!! @#$%^&*() [] {} <> / \\ | ~ `",
    "café crème brûlée naïve façade",
    "cafe\u0301 (decomposed accent must be composed first)",
    "emoji 🐱🚀✨ 👩‍👩‍👧 🇫🇷 in a prompt",
    "日本語のテキストと中文",
    "ΟΔΟΣ ΣΟΦΟΣ greek with final sigma",
    "Привет мир, кириллица",
    "pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious",
    "don't can't we're you've I'm they'll he'd IT'S",
    "İstanbul ß straße ﬁligature",
    "snake_case_words and camelCaseWords and kebab-case-words",
    "url https://example.com/path?q=1&x=2",
    "a <|endoftext|> literal special and <|startoftext|> too",
    "x",
    "",
    "   ",
]


# ---------------------------------------------------------------- reference BPE
# CLIP's pre-tokenisation pattern (case-insensitive, as CLIP compiles it).
_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP: printable Latin-1 bytes stand for themselves, the rest are
    # shifted to code points from 256 up, in byte order.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


class ReferenceBPE:
    """Classic CLIP BPE: repeatedly merge the lowest-ranked adjacent pair."""

    def __init__(self, vocab_path: Path, merges_path: Path) -> None:
        self.vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("#version")
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines[1:]) if line}
        self.byte_map = _byte_to_unicode()

    def _bpe(self, word: str) -> list[str]:
        parts = [self.byte_map[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        # CLIP's cleaning: NFC (ftfy), collapse whitespace, strip, lower-case.
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids: list[int] = []
        for word in _PAT.findall(text):
            if word in _SPECIALS:
                ids.append(self.vocab[word])
            else:
                ids.extend(self.vocab[piece] for piece in self._bpe(word))
        return ids


@functools.cache
def _reference() -> ReferenceBPE:
    return ReferenceBPE(DATA_DIR / "vocab.json", DATA_DIR / "merges.txt")


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


# ---------------------------------------------------------------- known facts
def test_constants() -> None:
    assert (BOS_ID, EOS_ID, MAX_LENGTH, CHUNK_TOKENS) == (49406, 49407, 77, 75)
    assert MAX_LENGTH == CHUNK_TOKENS + 2


def test_known_ids_from_design(tok: ClipTokenizer) -> None:
    assert [BOS_ID, *tok.encode("a photo of a cat"), EOS_ID] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocab_size(tok: ClipTokenizer) -> None:
    assert tok.vocab_size == 49408


def test_loader_is_cached(tok: ClipTokenizer) -> None:
    assert load_clip_tokenizer() is tok


def test_special_tokens_and_padding(tok: ClipTokenizer) -> None:
    hf = tok._hf  # the wrapped transformers tokenizer: its pad must be CLIP's EOS
    assert hf.pad_token == "<|endoftext|>" and hf.pad_token_id == EOS_ID
    assert hf.bos_token_id == BOS_ID and hf.eos_token_id == EOS_ID


def test_no_bos_eos_and_no_truncation(tok: ClipTokenizer) -> None:
    ids = tok.encode("cat " * 200)
    assert len(ids) == 200 and BOS_ID not in ids and EOS_ID not in ids
    assert tok.encode("") == []


def test_clip_normalisation(tok: ClipTokenizer) -> None:
    # Lower-casing and whitespace collapse, as CLIP's whitespace_clean + lower().
    base = tok.encode("a photo of a cat")
    assert tok.encode("A  PHOTO\tof\n\n a   Cat ") == base
    assert tok.encode("\u00a0a photo of a cat\u3000") == base
    # NFC: a decomposed accent encodes like the composed one.
    assert tok.encode("cafe\u0301") == tok.encode("café")
    # Python-style lower-casing: a word-final capital sigma becomes "ς".
    assert tok.encode("ΟΔΟΣ") == tok.encode("οδος")


def test_decode_round_trip(tok: ClipTokenizer) -> None:
    assert tok.decode(tok.encode("A photo of a CAT")) == "a photo of a cat"
    assert tok.decode([BOS_ID, *tok.encode("café 🐱"), EOS_ID, EOS_ID]) == "café 🐱"
    assert tok.decode([]) == ""


# ---------------------------------------------------------------- vocab file layout
def test_vocab_file_layout() -> None:
    ref = _reference()
    vocab = ref.vocab
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    byte_chars = list(_byte_to_unicode().values())
    for i, ch in enumerate(byte_chars):
        assert vocab[ch] == i and vocab[ch + "</w>"] == 256 + i
    assert len(ref.ranks) == 48894
    for (a, b), rank in ref.ranks.items():
        assert vocab[a + b] == 512 + rank
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID


# ---------------------------------------------------------------- cross-checks
@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_reference_bpe(tok: ClipTokenizer, prompt: str) -> None:
    assert tok.encode(prompt) == _reference().encode(prompt)


def test_transformers_file_loader_agrees(tok: ClipTokenizer) -> None:
    """transformers reading vocab.json/merges.txt itself (its from_pretrained path) agrees."""
    from transformers import CLIPTokenizer

    # A local folder with local_files_only: resolved on disk, no hub access.
    other = CLIPTokenizer.from_pretrained(str(DATA_DIR), local_files_only=True)
    assert len(other) == 49408
    for prompt in PROMPTS:
        # Compare on already-lower-cased text: the only deliberate difference is
        # our Python-side lower-casing (final sigma) before the backend.
        text = unicodedata.normalize("NFC", prompt).lower()
        assert tok.encode(text) == other(text, add_special_tokens=False)["input_ids"], prompt


def test_wrapper_rejects_a_tokenizer_without_the_vocab() -> None:
    # transformers 5's CLIPTokenizer accepts vocab_file=/merges_file= without
    # reading them (a 3-token vocab, every word -> <|endoftext|>); the wrapper
    # must refuse such a tokenizer rather than encode garbage.
    from transformers import CLIPTokenizer

    # Built with no vocabulary at all, so this does not depend on that quirk persisting.
    empty = CLIPTokenizer()
    with pytest.raises(ValueError):
        ClipTokenizer(empty)

"""Prompt text -> text-encoder hidden states, with A1111 weighting, embeddings and prompts of any length.

A prompt is parsed into weighted fragments, tokenized, and cut into chunks of 75 tokens; each chunk is
encoded as BOS + tokens + EOS, padded to 77 positions (CLIP-L pads with EOS, the OpenCLIP towers of SD 2.x and
SDXL with 0, see :class:`engine.text_encoder.Encoding`) and the chunks are concatenated along the
token axis. SD 1.x and SD 2.x use :class:`PromptEncoder` (one text model, the family's ``Encoding``); SDXL uses
:class:`SDXLPromptEncoder` (two text models over the same chunks, plus a pooled output). Weights multiply each token's hidden state, then the chunk is rescaled so that its mean equals
the unweighted mean (so emphasis changes direction, not overall magnitude). Like A1111, a chunk that fills
up within 20 tokens of a comma is cut after that comma so phrases are not split across chunks.

``<lora:...>`` tags are cut out of the text first (:mod:`engine.adapters.prompt_tags`): the pipeline merges
those LoRAs, and the words of a tag must never reach the text encoder.

Textual-inversion embeddings work as in A1111 (``modules/sd_hijack_clip.py``): where a fragment's tokens
equal the tokens of an embedding's name (longest name first; CLIP lower-cases, so the name matches in any
case), the name becomes one placeholder token per vector, each carrying the fragment's weight. Vectors that do
not fit the rest of the current chunk close it (EOS-padded, as a BREAK would) and start the next. At encoding,
a forward hook on the token-embedding layer writes the vectors over the placeholders' input embeddings;
position embeddings and everything after are the model's own.

Deliberate difference from A1111: when the comma backtrack moves the tail of a full chunk into the next one,
an embedding in that tail moves with its vectors. A1111 moves the placeholder tokens but leaves the vectors
behind, so the embedding silently turns into token 0 ("!") -- an accident, not a behaviour anyone relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from transformers import CLIPTextModelWithProjection

from engine.adapters.embeddings import Embedding
from engine.adapters.prompt_tags import strip_lora_tags
from engine.adapters.refs import AdapterError
from engine.prompt_weights import BREAK, BREAK_WEIGHT, parse_prompt_attention
from engine.text_encoder import (
    SD1_ENCODING,
    SDXL_CLIP_G_ENCODING,
    SDXL_CLIP_L_ENCODING,
    Encoding,
    TextModel,
    encode_with_pooled,
    text_transformer,
)
from engine.tokenizer import BOS_ID, CHUNK_TOKENS, EOS_ID, ClipTokenizer

COMMA_BACKTRACK = 20
# The id under an embedding's vectors, as in A1111 (the hook overwrites its input embedding). Not EOS: models
# that pool at the first EOS (SDXL's encoders) must still find the real one.
PLACEHOLDER_ID = 0

T = TypeVar("T")


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # (offset into ``tokens``, embedding): its vectors go at tokens[offset : offset + n_vectors].
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)

    def framed(self, pad_id: int = EOS_ID) -> tuple[list[int], list[float]]:
        """BOS + tokens + EOS, padded to 77 with ``pad_id`` (CLIP-L: EOS again; OpenCLIP towers: 0)."""
        pad = CHUNK_TOKENS - len(self.tokens)
        return (
            [BOS_ID, *self.tokens, EOS_ID, *([pad_id] * pad)],
            [1.0, *self.weights, 1.0, *([1.0] * pad)],
        )


class _NameLookup(Generic[T]):
    """Names matched in token streams by their token sequences, longest first (A1111's ``ids_lookup``)."""

    def __init__(self, named: Mapping[str, T], tokenizer: ClipTokenizer):
        self._by_ids: dict[tuple[int, ...], list[tuple[str, T]]] = {}
        for name, value in named.items():
            ids = tuple(tokenizer.encode(name))
            if ids:  # a blank name cannot be written in a prompt
                self._by_ids.setdefault(ids, []).append((name, value))
        self._by_first: dict[int, list[tuple[int, ...]]] = {}
        for ids in sorted(self._by_ids, key=len, reverse=True):
            self._by_first.setdefault(ids[0], []).append(ids)

    def match(self, tokens: Sequence[int], pos: int) -> tuple[str, T, int] | None:
        """(name, value, tokens used) of the longest name starting at ``tokens[pos]``, or None."""
        for ids in self._by_first.get(tokens[pos], ()):
            if tuple(tokens[pos:pos + len(ids)]) == ids:
                entries = self._by_ids[ids]
                if any(value is not entries[0][1] for _, value in entries[1:]):
                    names = " and ".join(repr(n) for n, _ in entries)
                    raise AdapterError(None, f"embeddings {names} have the same name apart from case or spacing; "
                                             "a prompt cannot tell them apart (rename or remove one)")
                name, value = entries[0]
                return name, value, len(ids)
        return None


def _pieces(prompt: str) -> list[tuple[str, float]]:
    return parse_prompt_attention(strip_lora_tags(prompt))


def chunk_prompt(
    prompt: str, tokenizer: ClipTokenizer, embeddings: Mapping[str, Embedding] | None = None
) -> list[PromptChunk]:
    """Weighted 75-token chunks of a prompt (at least one chunk, possibly empty), with its embeddings placed."""
    comma_id = tokenizer.encode(",")[0]
    lookup = _NameLookup(embeddings, tokenizer) if embeddings else None
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for text, weight in _pieces(prompt):
        if text == BREAK and weight == BREAK_WEIGHT:
            close()
            continue
        tokens = tokenizer.encode(text)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # Move the words after the last comma (and any embedding among them) into the next chunk.
                cut = last_comma + 1
                moved = PromptChunk(
                    chunk.tokens[cut:], chunk.weights[cut:], [(o - cut, e) for o, e in chunk.fixes if o >= cut]
                )
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.fixes = [(o, e) for o, e in chunk.fixes if o < cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_TOKENS:
                close()
            found = lookup.match(tokens, pos) if lookup else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            _, embedding, used = found
            n = embedding.n_vectors
            if not 0 < n <= CHUNK_TOKENS:
                raise AdapterError(embedding.file.path, f"embedding {embedding.name!r} has {n} vectors; "
                                                        f"an embedding must have 1 to {CHUNK_TOKENS} (one prompt chunk)")
            if len(chunk.tokens) + n > CHUNK_TOKENS:
                close()  # the vectors stay together: they start the next chunk
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [PLACEHOLDER_ID] * n
            chunk.weights += [weight] * n
            pos += used
    if chunk.tokens or not chunks:
        close()
    return chunks


def embeddings_named_in(text: str, names: Iterable[str], tokenizer: ClipTokenizer) -> list[str]:
    """Which of ``names`` the prompt ``text`` uses as embeddings, in order of first use.

    The same matching as :func:`chunk_prompt` (tags cut out, per weighted fragment, longest name first), so a
    caller can find the files a prompt needs before reading any of them.
    """
    lookup = _NameLookup({name: name for name in names}, tokenizer)
    used: dict[str, None] = {}
    for piece, weight in _pieces(text):
        if piece == BREAK and weight == BREAK_WEIGHT:
            continue
        tokens = tokenizer.encode(piece)
        pos = 0
        while pos < len(tokens):
            found = lookup.match(tokens, pos)
            if found is None:
                pos += 1
            else:
                used.setdefault(found[0])
                pos += found[2]
    return list(used)


def _token_embedding(model: TextModel) -> torch.nn.Embedding:
    return text_transformer(model).embeddings.token_embedding


Fixes = Sequence[Sequence[tuple[int, Embedding]]]


def run_text_encoder(
    model: TextModel, ids: torch.Tensor, fixes: Fixes, clip_skip: int, encoding: Encoding, *, pooled: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled output or None) of framed chunks ``ids``, each row's embeddings written over its
    placeholders' input embeddings for this call only."""

    def run() -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_with_pooled(
            model, ids, clip_skip, final_norm=encoding.final_norm, min_skip=encoding.min_skip, pooled=pooled
        )

    if not any(fixes):
        return run()
    layer = _token_embedding(model)
    width = layer.embedding_dim
    for row in fixes:
        for _, emb in row:
            if emb.vectors.ndim != 2 or emb.vectors.shape[1] != width:
                raise AdapterError(emb.file.path, f"embedding vectors are {emb.vectors.shape[-1]} wide; "
                                                  f"this model's text encoder is {width} wide")

    def overwrite(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if tuple(output.shape[:2]) != tuple(ids.shape):
            raise RuntimeError(f"token embedding saw shape {tuple(output.shape)}, expected {tuple(ids.shape)} rows")
        output = output.clone()
        for row, row_fixes in enumerate(fixes):
            for offset, emb in row_fixes:
                start = 1 + offset  # after BOS
                output[row, start:start + emb.n_vectors] = emb.vectors.to(output.device, output.dtype)
        return output

    # The hook lives only for this call (removed even when encoding fails), so other users of the model --
    # and the next prompt without embeddings -- see the plain layer.
    handle = layer.register_forward_hook(overwrite)
    try:
        return run()
    finally:
        handle.remove()


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on (chunks, 77, width) float hidden states: multiply each token by its weight,
    then rescale each chunk so its mean equals the unweighted mean."""
    if torch.all(weights == 1.0):
        return z
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[:, :, None]
    return z * (original_mean / z.mean(dim=(1, 2), keepdim=True))


def _framed(chunks: Sequence[PromptChunk], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    framed = [c.framed(pad_id) for c in chunks]
    ids = torch.tensor([f[0] for f in framed], device=device)
    weights = torch.tensor([f[1] for f in framed], device=device, dtype=torch.float32)
    return ids, weights


def _pad_batch(encoded: Sequence[torch.Tensor], empty: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """(B, max_chunks * 77, width): shorter prompts are padded with empty-prompt chunks (``empty(i)`` for prompt
    i, asked for only when needed), as A1111 does, so prompts of different lengths (and cond with uncond) share
    one batch."""
    longest = max(e.shape[0] for e in encoded)
    padded = []
    for i, e in enumerate(encoded):
        if e.shape[0] < longest:
            pad = empty(i)
            e = torch.cat([e, *([pad] * ((longest - e.shape[0]) // pad.shape[0]))])
        padded.append(e)
    return torch.stack(padded)


class _CachingEncoder(Generic[T]):
    """What both prompt encoders share: the cached encoding of the empty prompt (the padding chunk) per clip skip,
    and encoding a batch of prompts with one clip skip and one embeddings mapping each, through the subclass's
    ``encode(prompt, clip_skip, embeddings)``."""

    def __init__(self) -> None:
        self._empty: dict[int, T] = {}

    def clear_cache(self) -> None:
        """Forget cached encodings; call it whenever a text encoder's weights change (a LoRA merged or removed)."""
        self._empty.clear()

    def empty_chunk(self, clip_skip: int = 1) -> T:
        if clip_skip not in self._empty:
            self._empty[clip_skip] = self.encode("", clip_skip)
        return self._empty[clip_skip]

    def _encode_each(self, prompts: Sequence[str], clip_skips: Sequence[int] | None,
                     embeddings: Sequence[Mapping | None] | None) -> tuple[list[T], list[int]]:
        skips = list(clip_skips) if clip_skips is not None else [1] * len(prompts)
        maps = list(embeddings) if embeddings is not None else [None] * len(prompts)
        if len(maps) != len(prompts):
            raise ValueError(f"{len(maps)} embedding mappings for {len(prompts)} prompts")
        return [self.encode(p, s, m) for p, s, m in zip(prompts, skips, maps, strict=True)], skips


class PromptEncoder(_CachingEncoder[torch.Tensor]):
    """Encodes prompts with one text model (SD 1.x, or SD 2.x with ``encoding=SD2_ENCODING``); caches the encoding
    of the empty chunk used for padding."""

    def __init__(
        self,
        model: TextModel,
        tokenizer: ClipTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        encoding: Encoding = SD1_ENCODING,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.encoding = encoding

    @torch.no_grad()
    def encode(self, prompt: str, clip_skip: int = 1, embeddings: Mapping[str, Embedding] | None = None) -> torch.Tensor:
        """(n_chunks * 77, hidden) conditioning for one prompt; ``embeddings`` maps prompt names to embeddings."""
        chunks = chunk_prompt(prompt, self.tokenizer, embeddings)
        ids, weights = _framed(chunks, self.encoding.pad_id, self.device)
        z, _ = run_text_encoder(self.model, ids, [c.fixes for c in chunks], clip_skip, self.encoding)
        z = emphasize(z.float(), weights)
        return z.reshape(-1, z.shape[-1]).to(self.dtype)

    def encode_batch(
        self,
        prompts: Sequence[str],
        clip_skips: Sequence[int] | None = None,
        embeddings: Sequence[Mapping[str, Embedding] | None] | None = None,
    ) -> torch.Tensor:
        """(B, max_chunks * 77, hidden), shorter prompts padded with empty-prompt chunks. ``embeddings``: one
        mapping (or None) per prompt."""
        encoded, skips = self._encode_each(prompts, clip_skips, embeddings)
        return _pad_batch(encoded, lambda i: self.empty_chunk(skips[i]))


# ---- SDXL: two text encoders over the same chunks -------------------------------------------------------------

# An SDXL embedding file holds one set of vectors per text encoder: part key ("clip_l", "clip_g") -> Embedding, as
# engine.adapters.embeddings.read_sdxl_embedding returns it.
PartEmbeddings = Mapping[str, Embedding]


@dataclass(frozen=True)
class EncoderPart:
    """One text encoder of a multi-encoder family: its model, how it is read, and which part of an SDXL embedding
    file belongs to it."""

    model: TextModel
    encoding: Encoding
    key: str


class SDXLPromptEncoder(_CachingEncoder[tuple[torch.Tensor, torch.Tensor]]):
    """SDXL's conditioning: every part encodes the same weighted 75-token chunks (its own padding id, its own
    emphasis rescale, as A1111's per-embedder hijack does); the parts' hidden states are concatenated on the feature
    axis (CLIP-L 768 + bigG 1280 = 2048) and the chunks along the token axis. The pooled output is the last part's
    (bigG, which has ``text_projection``) for the *first* chunk only, unweighted -- as A1111 (``zs[0].pooled``) and
    ComfyUI (``first_pooled``) do. The refiner is the same with bigG alone."""

    def __init__(self, parts: Sequence[EncoderPart], tokenizer: ClipTokenizer, device: torch.device, dtype: torch.dtype):
        if not parts or not hasattr(parts[-1].model, "text_projection"):
            raise ValueError("the last text encoder must have a text_projection (it gives the pooled output)")
        super().__init__()
        self.parts = tuple(parts)
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype

    @classmethod
    def base(cls, clip_l: TextModel, clip_g: CLIPTextModelWithProjection, tokenizer: ClipTokenizer,
             device: torch.device, dtype: torch.dtype) -> "SDXLPromptEncoder":
        parts = (EncoderPart(clip_l, SDXL_CLIP_L_ENCODING, "clip_l"), EncoderPart(clip_g, SDXL_CLIP_G_ENCODING, "clip_g"))
        return cls(parts, tokenizer, device, dtype)

    @classmethod
    def refiner(cls, clip_g: CLIPTextModelWithProjection, tokenizer: ClipTokenizer, device: torch.device,
                dtype: torch.dtype) -> "SDXLPromptEncoder":
        return cls((EncoderPart(clip_g, SDXL_CLIP_G_ENCODING, "clip_g"),), tokenizer, device, dtype)

    def _part_fixes(self, chunks: Sequence[PromptChunk], by_id: Mapping[int, PartEmbeddings], key: str) -> Fixes:
        return [[(offset, by_id[id(emb)][key]) for offset, emb in c.fixes] for c in chunks]

    @torch.no_grad()
    def encode(
        self, prompt: str, clip_skip: int = 1, embeddings: Mapping[str, PartEmbeddings] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((n_chunks * 77, sum of widths) context, (projection_dim,) pooled) for one prompt. ``embeddings`` maps
        prompt names to an embedding per part; clip skip applies to every part, with layer -2 as the floor."""
        first_key = self.parts[0].key
        by_id: dict[int, PartEmbeddings] = {}
        named: dict[str, Embedding] = {}
        for name, per_part in (embeddings or {}).items():
            missing = [p.key for p in self.parts if p.key not in per_part]
            if missing:
                raise AdapterError(None, f"embedding {name!r} has no {missing[0]} vectors; SDXL needs "
                                         f"{' and '.join(p.key for p in self.parts)}")
            counts = {per_part[p.key].n_vectors for p in self.parts}
            if len(counts) > 1:
                raise AdapterError(per_part[first_key].file.path, f"embedding {name!r} has different vector counts "
                                                                  "per text encoder")
            named[name] = per_part[first_key]  # chunking needs the vector count only
            by_id[id(per_part[first_key])] = per_part
        chunks = chunk_prompt(prompt, self.tokenizer, named)
        outputs: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for part in self.parts:
            ids, weights = _framed(chunks, part.encoding.pad_id, self.device)
            last = part is self.parts[-1]
            z, p = run_text_encoder(part.model, ids, self._part_fixes(chunks, by_id, part.key), clip_skip,
                                    part.encoding, pooled=last)
            outputs.append(emphasize(z.float(), weights))
            if last:
                pooled = p[0]  # type: ignore[index]
        context = torch.cat(outputs, dim=-1)
        return context.reshape(-1, context.shape[-1]).to(self.dtype), pooled.to(self.dtype)  # type: ignore[union-attr]

    def encode_batch(
        self,
        prompts: Sequence[str],
        clip_skips: Sequence[int] | None = None,
        embeddings: Sequence[Mapping[str, PartEmbeddings] | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, max_chunks * 77, width) context, (B, projection_dim) pooled); shorter prompts' context is padded
        with empty-prompt chunks (their pooled output stays their own first chunk's)."""
        encoded, skips = self._encode_each(prompts, clip_skips, embeddings)
        context = _pad_batch([c for c, _ in encoded], lambda i: self.empty_chunk(skips[i])[0])
        return context, torch.stack([p for _, p in encoded])

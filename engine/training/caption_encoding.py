"""Captions -> text-encoder hidden states for training, the same numbers the pipeline's prompt encoder gives.

:class:`engine.conditioning.PromptEncoder` runs under ``torch.no_grad`` (it serves inference); a LoRA on the text
encoder, or an embedding's vectors, need gradients through it. This module repeats its recipe with autograd on,
from the same parts: :func:`engine.conditioning.chunk_prompt` (A1111 weighting, 75-token chunks, comma backtrack,
embedding placement), the family's :class:`engine.text_encoder.Encoding` (padding id, clip-skip floor, final layer
norm), :func:`emphasize`, and padding of shorter captions with the empty prompt's chunk. Tests hold the two to
equality, so what the LoRA or the embedding learns to respond to is exactly what a prompt will feed it.

SDXL (:func:`encode_sdxl_captions`, :class:`SDXLConditioning`) repeats :class:`engine.conditioning.SDXLPromptEncoder`
the same way: CLIP-L and bigG over the same chunks, each with its own padding id and emphasis rescale, concatenated
on the feature axis; the pooled bigG output of each caption's first chunk, unweighted; and the U-Net's ``y`` =
pooled ++ :func:`engine.unet.sdxl_size_embedding` as ``engine.pipeline.Pipeline._conditioning`` builds it. A dropped
caption is "" encoded like any prompt: the pipeline's uncond for an empty negative prompt is that too (no zeroing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from engine.adapters.embeddings import Embedding
from engine.conditioning import PromptChunk, chunk_prompt, emphasize
from engine.text_encoder import (
    SD1_ENCODING, SD2_ENCODING, SDXL_CLIP_G_ENCODING, SDXL_CLIP_L_ENCODING, Encoding, TextModel, pooled_output,
    text_transformer,
)
from engine.tokenizer import ClipTokenizer
from engine.unet import sdxl_size_embedding


def family_encoding(models) -> Encoding:
    """The encoding the pipeline uses for a one-text-encoder model (engine.pipeline._prompt_encoder's rule)."""
    return SD2_ENCODING if "openclip-h" in models.family.text_encoders else SD1_ENCODING


def encode_captions(
    model: TextModel, tokenizer: ClipTokenizer, encoding: Encoding, captions: Sequence[str], *,
    clip_skip: int = 1, device: torch.device | str = "cpu", embeddings: Mapping[str, Embedding] | None = None,
) -> torch.Tensor:
    """(B, max_chunks * 77, width) float32 hidden states, with gradients where the model's parameters (or the
    ``embeddings``' vectors) have them.

    All chunks of all captions (and one empty chunk, if a caption is shorter than the longest) go through the
    encoder as one batch. ``embeddings`` are placed as the pipeline places them, their vectors written over the
    placeholders' input embeddings."""
    per_caption = [chunk_prompt(c, tokenizer, embeddings) for c in captions]
    chunks = _batch_chunks(per_caption, tokenizer)
    z, _ = _run_chunks(model, encoding, chunks, clip_skip, device, with_fixes=embeddings is not None)
    return _per_caption(z, per_caption, len(chunks))


def _batch_chunks(per_caption: list[list[PromptChunk]], tokenizer: ClipTokenizer) -> list[PromptChunk]:
    """All captions' chunks in order, then one empty chunk if a caption is shorter than the longest (the padding
    chunk, as the pipeline pads batches)."""
    longest = max(len(c) for c in per_caption)
    chunks: list[PromptChunk] = [chunk for cs in per_caption for chunk in cs]
    if any(len(c) < longest for c in per_caption):
        chunks.append(chunk_prompt("", tokenizer)[0])
    return chunks


def _run_chunks(
    model: TextModel, encoding: Encoding, chunks: list[PromptChunk], clip_skip: int, device: torch.device | str,
    *, with_fixes: bool = False, pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((chunks, 77, width) emphasized float32 hidden states, (chunks, projection) pooled or None), with autograd."""
    framed = [c.framed(encoding.pad_id) for c in chunks]
    ids = torch.tensor([f[0] for f in framed], device=device)
    weights = torch.tensor([f[1] for f in framed], device=device, dtype=torch.float32)
    inner = text_transformer(model)
    skip = max(clip_skip, encoding.min_skip)
    if skip > inner.config.num_hidden_layers:
        raise ValueError(f"clip skip {skip} exceeds the text encoder's {inner.config.num_hidden_layers} layers")

    def overwrite(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        # The pipeline's write-over (engine.conditioning.run_text_encoder), outside no_grad: the vectors stay in
        # the graph, the frozen table's rows under the placeholders do not.
        output = output.clone()
        for row, chunk in enumerate(chunks):
            for offset, emb in chunk.fixes:
                output[row, 1 + offset:1 + offset + emb.n_vectors] = emb.vectors.to(output.device, output.dtype)
        return output

    handle = inner.embeddings.token_embedding.register_forward_hook(overwrite) if with_fixes else None
    try:
        if skip == 1 and encoding.final_norm:
            out = inner(input_ids=ids)
            hidden = out.last_hidden_state
        else:
            out = inner(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[-skip]
            if encoding.final_norm:
                hidden = inner.final_layer_norm(hidden)
    finally:
        if handle is not None:
            handle.remove()
    # The pooled output ignores clip skip and emphasis (engine.text_encoder.encode_with_pooled).
    pool = pooled_output(model, out.last_hidden_state, ids) if pooled else None  # type: ignore[arg-type]
    return emphasize(hidden.float(), weights), pool


def _per_caption(z: torch.Tensor, per_caption: list[list[PromptChunk]], n_chunks: int) -> torch.Tensor:
    """(B, longest * 77, width): each caption's chunks side by side, padded with the empty chunk (z's last row)."""
    longest = max(len(c) for c in per_caption)
    empty = z[-1] if n_chunks > sum(len(c) for c in per_caption) else None
    out, start = [], 0
    for cs in per_caption:
        rows = [z[start + i] for i in range(len(cs))] + [empty] * (longest - len(cs))  # type: ignore[list-item]
        out.append(torch.cat(rows))
        start += len(cs)
    return torch.stack(out)


def encode_sdxl_captions(
    clip_l: TextModel, clip_g: TextModel, tokenizer: ClipTokenizer, captions: Sequence[str], *,
    clip_skip: int = 1, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, max_chunks * 77, width_l + width_g) context, (B, projection) pooled) as SDXLPromptEncoder gives them,
    with gradients through both encoders. The pooled output is each caption's first chunk's, as the pipeline's."""
    per_caption = [chunk_prompt(c, tokenizer) for c in captions]
    chunks = _batch_chunks(per_caption, tokenizer)
    z_l, _ = _run_chunks(clip_l, SDXL_CLIP_L_ENCODING, chunks, clip_skip, device)
    z_g, pooled = _run_chunks(clip_g, SDXL_CLIP_G_ENCODING, chunks, clip_skip, device, pooled=True)
    firsts = torch.tensor([sum(len(c) for c in per_caption[:i]) for i in range(len(per_caption))], device=z_g.device)
    context = _per_caption(torch.cat([z_l, z_g], dim=-1), per_caption, len(chunks))
    return context, pooled[firsts]  # type: ignore[index]


def sdxl_y(pooled: torch.Tensor, size_ids: torch.Tensor) -> torch.Tensor:
    """The U-Net's ``y``: pooled text ++ the size embedding of (orig h, w, crop top, left, target h, w) rows."""
    return torch.cat([pooled.float(), sdxl_size_embedding(size_ids.float()).to(pooled.device)], dim=-1)


class CaptionContexts:
    """Captions -> a training step's context. A training text encoder runs on every step; a frozen one encodes
    each caption once (its output cannot change), except for a batch of mixed chunk counts, which is encoded whole
    so the padder pads it with the empty prompt as the pipeline does."""

    def __init__(self, models, *, clip_skip: int, trains: bool,
                 embeddings: Mapping[str, Embedding] | None = None) -> None:
        # Training embeddings (pivotal tuning) change the output like a training encoder does: never cached.
        self.models, self.clip_skip, self.trains = models, clip_skip, trains or bool(embeddings)
        self.embeddings = dict(embeddings) if embeddings else None
        self.encoding = family_encoding(models)
        self.frozen: dict[str, torch.Tensor] = {}  # caption -> context, when the text encoder does not train

    def encode(self, captions: list[str]) -> torch.Tensor:
        return encode_captions(self.models.text_encoder, self.models.tokenizer, self.encoding, captions,
                               clip_skip=self.clip_skip, device=self.models.device, embeddings=self.embeddings)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self.trains:
            return self.encode(captions)
        with torch.no_grad():
            for c in dict.fromkeys(captions):
                if c not in self.frozen:
                    self.frozen[c] = self.encode([c])[0]
            if len({self.frozen[c].shape[0] for c in captions}) > 1:
                return self.encode(captions)
            return torch.stack([self.frozen[c] for c in captions])


class SDXLConditioning:
    """Captions and size rows -> an SDXL training step's (context, y), caching a frozen pair of encoders' output per
    caption as :class:`CaptionContexts` does."""

    def __init__(self, models, *, clip_skip: int, trains: bool) -> None:
        self.models, self.clip_skip, self.trains = models, clip_skip, trains
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.models
        return encode_sdxl_captions(m.text_encoder, m.text_encoder_2, m.tokenizer, captions,
                                    clip_skip=self.clip_skip, device=m.device)

    def __call__(self, captions: list[str], size_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trains:
            context, pooled = self.encode(captions)
            return context, sdxl_y(pooled, size_ids)
        with torch.no_grad():
            for c in dict.fromkeys(captions):
                if c not in self.frozen:
                    context, pooled = self.encode([c])
                    self.frozen[c] = (context[0], pooled[0])
            if len({self.frozen[c][0].shape[0] for c in captions}) > 1:
                context, pooled = self.encode(captions)  # mixed chunk counts: padded as a batch, as the pipeline
            else:
                context = torch.stack([self.frozen[c][0] for c in captions])
                pooled = torch.stack([self.frozen[c][1] for c in captions])
            return context, sdxl_y(pooled, size_ids)

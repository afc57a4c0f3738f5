"""Prompt text -> text-encoder hidden states, with A1111 weighting and prompts of any length.

A prompt is parsed into weighted fragments, tokenized, and cut into chunks of 75 tokens; each chunk is
encoded as BOS + 75 tokens (EOS-padded) + EOS = 77 positions and the chunks are concatenated along the
token axis. Weights multiply each token's hidden state, then the chunk is rescaled so that its mean equals
the unweighted mean (so emphasis changes direction, not overall magnitude). Like A1111, a chunk that fills
up within 20 tokens of a comma is cut after that comma so phrases are not split across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import CLIPTextModel

from engine.prompt_weights import parse_prompt_attention
from engine.text_encoder import encode_tokens
from engine.tokenizer import BOS_ID, CHUNK_TOKENS, EOS_ID, ClipTokenizer

COMMA_BACKTRACK = 20


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def framed(self) -> tuple[list[int], list[float]]:
        pad = CHUNK_TOKENS - len(self.tokens)
        return (
            [BOS_ID, *self.tokens, *([EOS_ID] * pad), EOS_ID],
            [1.0, *self.weights, *([1.0] * pad), 1.0],
        )


def chunk_prompt(prompt: str, tokenizer: ClipTokenizer) -> list[PromptChunk]:
    """Weighted 75-token chunks of a prompt (at least one chunk, possibly empty)."""
    comma_id = tokenizer.encode(",")[0]
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for text, weight in parse_prompt_attention(prompt):
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenizer.encode(text):
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # Move the words after the last comma into the next chunk.
                cut = last_comma + 1
                moved = PromptChunk(chunk.tokens[cut:], chunk.weights[cut:])
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk = moved
            if len(chunk.tokens) == CHUNK_TOKENS:
                close()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close()
    return chunks


class PromptEncoder:
    """Encodes prompts with one text model; caches the encoding of the empty chunk used for padding."""

    def __init__(self, model: CLIPTextModel, tokenizer: ClipTokenizer, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._empty: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """(n_chunks * 77, hidden) conditioning for one prompt."""
        chunks = chunk_prompt(prompt, self.tokenizer)
        framed = [c.framed() for c in chunks]
        ids = torch.tensor([f[0] for f in framed], device=self.device)
        weights = torch.tensor([f[1] for f in framed], device=self.device, dtype=torch.float32)
        z = encode_tokens(self.model, ids, clip_skip).float()
        if not torch.all(weights == 1.0):
            original_mean = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights[:, :, None]
            z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
        return z.reshape(-1, z.shape[-1]).to(self.dtype)

    def empty_chunk(self, clip_skip: int = 1) -> torch.Tensor:
        if clip_skip not in self._empty:
            self._empty[clip_skip] = self.encode("", clip_skip)
        return self._empty[clip_skip]

    def encode_batch(self, prompts: list[str], clip_skips: list[int] | None = None) -> torch.Tensor:
        """(B, max_chunks * 77, hidden): shorter prompts are padded with empty-prompt chunks, as A1111 does,
        so prompts of different lengths (and cond with uncond) share one batch."""
        skips = clip_skips or [1] * len(prompts)
        encoded = [self.encode(p, s) for p, s in zip(prompts, skips, strict=True)]
        longest = max(e.shape[0] for e in encoded)
        padded = []
        for e, s in zip(encoded, skips):
            if e.shape[0] < longest:
                empty = self.empty_chunk(s)
                e = torch.cat([e, *([empty] * ((longest - e.shape[0]) // empty.shape[0]))])
            padded.append(e)
        return torch.stack(padded)

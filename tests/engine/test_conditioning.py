"""Prompt -> chunks -> weighted hidden states, as A1111 builds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adapters.refs import AdapterError
from engine.conditioning import PromptEncoder, chunk_prompt
from engine.loading import load_checkpoint
from engine.tokenizer import BOS_ID, EOS_ID, load_clip_tokenizer


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> PromptEncoder:
    m = load_checkpoint(tiny_checkpoint)
    return PromptEncoder(m.text_encoder, m.tokenizer, m.device, m.dtype)


def test_short_prompt_is_one_framed_chunk() -> None:
    tok = load_clip_tokenizer()
    chunks = chunk_prompt("a photo of a cat", tok)
    assert len(chunks) == 1
    ids, weights = chunks[0].framed()
    assert len(ids) == 77 and ids[:6] == [BOS_ID, 320, 1125, 539, 320, 2368]
    assert ids[6:] == [EOS_ID] * 71 and weights == [1.0] * 77


def test_weights_follow_the_tokens() -> None:
    tok = load_clip_tokenizer()
    (chunk,) = chunk_prompt("a (red:1.5) [cube]", tok)
    assert chunk.tokens == tok.encode("a") + tok.encode("red") + tok.encode("cube")
    assert chunk.weights == pytest.approx([1.0, 1.5, 1 / 1.1])


def test_long_prompt_spills_into_more_chunks_and_break_starts_one() -> None:
    tok = load_clip_tokenizer()
    words = " ".join(["cat"] * 100)  # 100 tokens, no commas
    chunks = chunk_prompt(words, tok)
    assert [len(c.tokens) for c in chunks] == [75, 25]
    chunks = chunk_prompt("red cube BREAK blue sky", tok)
    assert [c.tokens for c in chunks] == [tok.encode("red cube"), tok.encode("blue sky")]
    assert chunk_prompt("", tok)[0].tokens == []


def test_a_full_chunk_is_cut_after_a_recent_comma() -> None:
    tok = load_clip_tokenizer()
    # 70 tokens, a comma at position 70, then 10 more words: the 10 words move whole into chunk two.
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = chunk_prompt(prompt, tok)
    assert len(first.tokens) == 71 and first.tokens[-1] == tok.encode(",")[0]
    assert second.tokens == tok.encode(" ".join(["dog"] * 10))


def test_encoding_shapes_and_padding(encoder: PromptEncoder) -> None:
    short = encoder.encode("a cat")
    long = encoder.encode(" ".join(["cat"] * 100))
    assert short.shape == (77, 32) and long.shape == (154, 32)
    batch = encoder.encode_batch(["a cat", " ".join(["cat"] * 100)])
    assert batch.shape == (2, 154, 32)
    # The short prompt is padded with the empty prompt's encoding, its own part unchanged.
    assert torch.equal(batch[0, :77], short) and torch.equal(batch[0, 77:], encoder.encode(""))


def test_weighting_scales_tokens_and_keeps_the_mean(encoder: PromptEncoder) -> None:
    plain = encoder.encode("a red cube").float()
    weighted = encoder.encode("a (red:1.5) cube").float()
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4, abs=1e-6)
    # Token 2 ("red") is scaled 1.5x relative to its neighbours, before the common rescale.
    ratio = weighted / plain
    factor = ratio[1].median()  # token 1 ("a") carries weight 1, only the rescale
    assert torch.allclose(ratio[2] / factor, torch.full_like(ratio[2], 1.5), rtol=1e-3)
    assert torch.allclose(ratio[3] / factor, torch.ones_like(ratio[3]), rtol=1e-3)


def test_clip_skip_two_differs_and_bounds_are_checked(encoder: PromptEncoder) -> None:
    assert not torch.allclose(encoder.encode("a cat", 1), encoder.encode("a cat", 2))
    with pytest.raises(ValueError, match="clip skip"):
        encoder.encode("a cat", 3)  # the tiny encoder has 2 layers


def test_lora_tags_are_cut_out_before_tokenizing(encoder: PromptEncoder) -> None:
    tok = load_clip_tokenizer()
    (chunk,) = chunk_prompt("a <lora:ink wash:0.6> (cat:1.2)<lyco:x:1:0>", tok)
    assert chunk.tokens == tok.encode("a") + tok.encode("cat") and chunk.weights == pytest.approx([1.0, 1.2])
    assert torch.equal(encoder.encode("a red cube <lora:style:0.8>"), encoder.encode("a red cube"))
    batch = encoder.encode_batch(["a cat <lora:x:1>", "<lora:y:0.5> ugly"])
    assert torch.equal(batch, encoder.encode_batch(["a cat", "ugly"]))
    with pytest.raises(AdapterError, match="hypernetworks are not supported"):
        encoder.encode("a cat <hypernet:anime:1>")


def test_clear_cache_drops_the_empty_chunk(encoder: PromptEncoder) -> None:
    first = encoder.empty_chunk(1)
    assert encoder.empty_chunk(1) is first
    encoder.clear_cache()
    again = encoder.empty_chunk(1)
    assert again is not first and torch.equal(again, first)


def test_batch_embedding_mappings_must_match_prompts(encoder: PromptEncoder) -> None:
    with pytest.raises(ValueError, match="1 embedding mappings for 2 prompts"):
        encoder.encode_batch(["a", "b"], None, [None])

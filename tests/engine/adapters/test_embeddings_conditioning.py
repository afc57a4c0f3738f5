"""Embeddings in prompts behave as A1111's: a file holding the input embeddings of some words encodes exactly
like those words, with their emphasis, in either prompt, and across 75-token chunk boundaries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adapters.embeddings import Embedding, read_embedding
from engine.adapters.refs import AdapterError, AdapterFile
from engine.conditioning import PLACEHOLDER_ID, PromptEncoder, chunk_prompt, embeddings_named_in
from engine.loading import load_checkpoint
from engine.tokenizer import CHUNK_TOKENS, load_clip_tokenizer
from tests.engine.adapters.test_embeddings import adapter, write_a1111, write_diffusers, write_kohya

NAME = "zorblax"  # not an English word: its tokens appear in no other test prompt
WORDS = "red cube"
EIGHT = "red cube blue sky green tree big dog"  # eight one-token words


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path) -> PromptEncoder:
    m = load_checkpoint(tiny_checkpoint)
    return PromptEncoder(m.text_encoder, m.tokenizer, m.device, m.dtype)


def rows_of(encoder: PromptEncoder, words: str) -> torch.Tensor:
    """The text encoder's own input embeddings of ``words``: an embedding that must encode exactly like them."""
    ids = encoder.tokenizer.encode(words)
    return encoder.model.embeddings.token_embedding.weight[ids].detach().clone()


def embedding(encoder: PromptEncoder, words: str, name: str = NAME) -> Embedding:
    return Embedding(name, rows_of(encoder, words), AdapterFile(name, f"/nowhere/{name}.pt"))


@pytest.mark.parametrize("layout", ["a1111", "kohya", "diffusers"])
def test_embedding_file_encodes_exactly_like_its_words(encoder: PromptEncoder, tmp_path: Path, layout: str) -> None:
    rows = rows_of(encoder, WORDS)
    writer, suffix = {"a1111": (write_a1111, ".pt"), "kohya": (write_kohya, ".safetensors"),
                      "diffusers": (write_diffusers, ".bin")}[layout]
    emb = read_embedding(adapter(writer(tmp_path / f"{NAME}{suffix}", rows)), width=rows.shape[1])
    got = encoder.encode(f"a photo of {NAME}, studio light", embeddings={NAME: emb})
    want = encoder.encode(f"a photo of {WORDS}, studio light")
    assert torch.equal(got, want)
    # the prompt without the embedding's vectors (the placeholder id) is something else
    assert not torch.equal(encoder.encode(f"a photo of {NAME}, studio light"), want)


def test_emphasis_weights_all_vectors_and_name_matches_in_any_case(encoder: PromptEncoder) -> None:
    emb = {NAME: embedding(encoder, WORDS)}
    want = encoder.encode(f"a ({WORDS}:1.2) [cat]")
    assert torch.equal(encoder.encode(f"a ({NAME}:1.2) [cat]", embeddings=emb), want)
    assert torch.equal(encoder.encode("a (ZorBlax:1.2) [cat]", embeddings=emb), want)
    (chunk,) = chunk_prompt(f"a ({NAME}:1.2)", encoder.tokenizer, emb)
    assert chunk.weights == pytest.approx([1.0, 1.2, 1.2])


def test_negative_prompt_and_batches(encoder: PromptEncoder) -> None:
    emb = {NAME: embedding(encoder, WORDS)}
    long = " ".join(["cat"] * 100)
    got = encoder.encode_batch([long, f"{NAME}, ugly"], [1, 1], [None, emb])
    want = encoder.encode_batch([long, f"{WORDS}, ugly"])
    assert got.shape == (2, 154, 32) and torch.equal(got, want)
    got2 = encoder.encode_batch([f"{NAME}", "x"], [2, 2], [emb, emb])  # clip skip 2 too
    assert torch.equal(got2, encoder.encode_batch([WORDS, "x"], [2, 2]))


def test_longest_name_wins_and_lora_tags_never_reach_the_encoder(encoder: PromptEncoder) -> None:
    # "zorb prime" starts with the tokens of "zorb": A1111 tries the longest name first
    embs = {"zorb": embedding(encoder, "cat", "zorb"), "zorb prime": embedding(encoder, WORDS, "zorb prime")}
    got = encoder.encode("zorb prime, zorb <lora:style:0.7>", embeddings=embs)
    assert torch.equal(got, encoder.encode(f"{WORDS}, cat"))
    tok = encoder.tokenizer
    assert embeddings_named_in("ZORB then zorb prime", embs, tok) == ["zorb", "zorb prime"]
    assert embeddings_named_in("zorb prime", embs, tok) == ["zorb prime"]
    # inside a tag the name is not a prompt word; and only whole tokens match
    assert embeddings_named_in("a <lora:zorb:1> cat", embs, tok) == []
    assert embeddings_named_in("zorbs zorbing", embs, tok) == []


def test_vectors_that_do_not_fit_start_the_next_chunk(encoder: PromptEncoder) -> None:
    emb = {NAME: embedding(encoder, EIGHT)}
    tok = encoder.tokenizer
    prompt = " ".join(["cat"] * 70) + f" {NAME} fish"
    first, second = chunk_prompt(prompt, tok, emb)
    assert len(first.tokens) == 70 and first.fixes == []
    assert second.tokens[:8] == [PLACEHOLDER_ID] * 8 and second.tokens[8:] == tok.encode("fish")
    assert [o for o, _ in second.fixes] == [0]
    # A1111: the chunk is closed (padded) exactly as a BREAK before the embedding would close it
    want = encoder.encode(" ".join(["cat"] * 70) + f" BREAK {EIGHT} fish")
    assert torch.equal(encoder.encode(prompt, embeddings=emb), want)
    # one token fewer before it and the eight vectors fit: positions 67..74 of the first chunk
    (only,) = chunk_prompt(" ".join(["cat"] * 67) + f" {NAME}", tok, emb)
    assert len(only.tokens) == CHUNK_TOKENS and [o for o, _ in only.fixes] == [67]


def test_comma_backtrack_moves_an_embedding_with_its_vectors(encoder: PromptEncoder) -> None:
    emb = {NAME: embedding(encoder, EIGHT)}
    # 60 cats, a comma, 6 dogs and the 8 vectors fill the chunk exactly; "fish" then cuts after the comma
    head = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 6)
    first, second = chunk_prompt(f"{head} {NAME} fish", encoder.tokenizer, emb)
    assert len(first.tokens) == 61 and first.fixes == []
    assert [o for o, _ in second.fixes] == [6] and second.tokens[6:14] == [PLACEHOLDER_ID] * 8
    want = encoder.encode(" ".join(["cat"] * 60) + ", BREAK " + " ".join(["dog"] * 6) + f" {EIGHT} fish")
    assert torch.equal(encoder.encode(f"{head} {NAME} fish", embeddings=emb), want)


def test_too_many_vectors_wrong_width_and_hook_removed_on_error(encoder: PromptEncoder) -> None:
    layer = encoder.model.embeddings.token_embedding
    huge = Embedding(NAME, torch.zeros(76, 32), AdapterFile(NAME, "/x/zorblax.pt"))
    with pytest.raises(AdapterError, match=r"/x/zorblax\.pt: embedding 'zorblax' has 76 vectors"):
        encoder.encode(NAME, embeddings={NAME: huge})
    wide = Embedding(NAME, torch.zeros(2, 768), AdapterFile(NAME, "/x/zorblax.pt"))
    with pytest.raises(AdapterError, match="768 wide; this model's text encoder is 32 wide"):
        encoder.encode(NAME, embeddings={NAME: wide})
    with pytest.raises(ValueError, match="clip skip"):
        encoder.encode(NAME, clip_skip=5, embeddings={NAME: embedding(encoder, WORDS)})
    assert not layer._forward_hooks
    assert torch.equal(encoder.encode(NAME), encoder.encode(NAME))  # and a plain prompt is plain again


def test_names_that_differ_only_in_case_are_ambiguous_when_used() -> None:
    tok = load_clip_tokenizer()
    names = ["EasyNegative", "easynegative", "other"]
    assert embeddings_named_in("a cat, other", names, tok) == ["other"]
    with pytest.raises(AdapterError, match="'EasyNegative' and 'easynegative' have the same name apart from case"):
        embeddings_named_in("a cat, EASYNEGATIVE", names, tok)

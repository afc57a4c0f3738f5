"""SDXL prompts: CLIP-L and bigG over the same chunks, against diffusers' ``StableDiffusionXLPipeline.encode_prompt``
run on the same two text models and tokenizers (the pipeline is built without U-Net, VAE or scheduler: prompt
encoding touches none of them).

diffusers truncates at 77 tokens and knows no weighting, so long prompts, BREAK and emphasis are checked against
its encodings of the chunks' own texts, combined as A1111 does: chunks concatenated along the token axis, the
pooled output of the first chunk, emphasis (multiply, then restore the mean) applied to each encoder's output.
"""

from __future__ import annotations

import pytest
import torch

from engine.adapters.embeddings import Embedding
from engine.adapters.refs import AdapterError, AdapterFile
from engine.conditioning import SDXLPromptEncoder, chunk_prompt, emphasize
from engine.random_checkpoint import randomize_
from engine.text_encoder import OPEN_CLIP_PAD_ID, TextEncoderConfig, build_text_encoder, reset_position_ids
from engine.tokenizer import EOS_ID, load_clip_tokenizer
from tests.engine.test_open_clip import hf_tokenizer, load_open_clip, random_open_clip

TOL = 1e-5
L_WIDTH, G_WIDTH, PROJ = 32, 48, 40  # different widths, so the concatenation order shows
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    clip_l = build_text_encoder(TextEncoderConfig(hidden_size=L_WIDTH, intermediate_size=37, num_layers=3, num_heads=4))
    randomize_(clip_l, torch.Generator().manual_seed(1))
    reset_position_ids(clip_l, "cpu")
    clip_g = load_open_clip(random_open_clip(2, width=G_WIDTH, mlp=4 * G_WIDTH, proj=PROJ), heads=4, with_projection=True)
    return clip_l.requires_grad_(False), clip_g


@pytest.fixture(scope="module")
def encoder(models) -> SDXLPromptEncoder:
    return SDXLPromptEncoder.base(*models, load_clip_tokenizer(), CPU, torch.float32)


@pytest.fixture(scope="module")
def pipe(models):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None, text_encoder=models[0], text_encoder_2=models[1], tokenizer=hf_tokenizer("<|endoftext|>"),
        tokenizer_2=hf_tokenizer("!"), unet=None, scheduler=None, add_watermarker=False,
    )


def reference(pipe, prompt: str, clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' (context [77, 2048-like], pooled) of one prompt."""
    context, _, pooled, _ = pipe.encode_prompt(prompt, device=CPU, do_classifier_free_guidance=False, clip_skip=clip_skip)
    return context[0], pooled[0]


def test_short_and_empty_prompts_equal_diffusers(encoder, pipe) -> None:
    for prompt in ("a photo of a cat, studio light", ""):
        context, pooled = encoder.encode(prompt)
        want_context, want_pooled = reference(pipe, prompt)
        assert context.shape == (77, L_WIDTH + G_WIDTH) and pooled.shape == (PROJ,)
        torch.testing.assert_close(context, want_context, rtol=0, atol=TOL)
        torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=TOL)


def test_chunks_are_framed_as_diffusers_tokenizers_frame_them(pipe) -> None:
    (chunk,) = chunk_prompt("a photo", load_clip_tokenizer())
    for tokenizer, pad in ((pipe.tokenizer, EOS_ID), (pipe.tokenizer_2, OPEN_CLIP_PAD_ID)):
        assert chunk.framed(pad)[0] == tokenizer("a photo", padding="max_length", max_length=77).input_ids


def test_long_prompt_concatenates_chunks_and_pools_the_first(encoder, pipe) -> None:
    context, pooled = encoder.encode(" ".join(["cat"] * 100))  # 75 + 25 tokens, no comma to backtrack to
    first, second = reference(pipe, " ".join(["cat"] * 75)), reference(pipe, " ".join(["cat"] * 25))
    assert context.shape == (154, L_WIDTH + G_WIDTH)
    torch.testing.assert_close(context, torch.cat([first[0], second[0]]), rtol=0, atol=TOL)
    torch.testing.assert_close(pooled, first[1], rtol=0, atol=TOL)


def test_break_starts_a_chunk(encoder, pipe) -> None:
    context, pooled = encoder.encode("red cube BREAK blue sky")
    first, second = reference(pipe, "red cube"), reference(pipe, "blue sky")
    torch.testing.assert_close(context, torch.cat([first[0], second[0]]), rtol=0, atol=TOL)
    torch.testing.assert_close(pooled, first[1], rtol=0, atol=TOL)


def test_emphasis_is_applied_per_encoder_and_not_to_the_pooled_output(encoder, pipe) -> None:
    context, pooled = encoder.encode("a (red:1.5) [cube]")
    plain, plain_pooled = reference(pipe, "a red cube")
    weights = torch.ones(1, 77)
    weights[0, 2], weights[0, 3] = 1.5, 1 / 1.1
    want = torch.cat([emphasize(plain[None, :, :L_WIDTH], weights), emphasize(plain[None, :, L_WIDTH:], weights)], -1)[0]
    torch.testing.assert_close(context, want, rtol=0, atol=TOL)
    torch.testing.assert_close(pooled, plain_pooled, rtol=0, atol=TOL)
    # each encoder's part keeps its own mean (a rescale over all 2048 features would not)
    for part in (slice(0, L_WIDTH), slice(L_WIDTH, None)):
        assert context[:, part].mean().item() == pytest.approx(plain[:, part].mean().item(), rel=1e-5, abs=1e-7)


def test_clip_skip_counts_from_the_last_layer_with_the_penultimate_as_floor(encoder, pipe) -> None:
    default = encoder.encode("a cat")
    assert all(torch.equal(a, b) for a, b in zip(encoder.encode("a cat", 2), default))
    context, pooled = encoder.encode("a cat", 3)
    want_context, want_pooled = reference(pipe, "a cat", clip_skip=1)  # diffusers counts beyond its default -2
    torch.testing.assert_close(context, want_context, rtol=0, atol=TOL)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=TOL)  # the pooled output ignores clip skip
    with pytest.raises(ValueError, match="exceeds"):
        encoder.encode("a cat", 4)


def test_batch_pads_context_with_empty_chunks_and_keeps_each_pooled(encoder) -> None:
    long = " ".join(["cat"] * 100)
    context, pooled = encoder.encode_batch(["a cat", long])
    assert context.shape == (2, 154, L_WIDTH + G_WIDTH) and pooled.shape == (2, PROJ)
    short_context, short_pooled = encoder.encode("a cat")
    assert torch.equal(context[0, :77], short_context) and torch.equal(context[0, 77:], encoder.encode("")[0])
    assert torch.equal(pooled[0], short_pooled) and torch.equal(pooled[1], encoder.encode(long)[1])
    first = encoder.empty_chunk(1)
    encoder.clear_cache()
    assert encoder.empty_chunk(1) is not first


def test_refiner_is_big_g_alone(models, pipe) -> None:
    refiner = SDXLPromptEncoder.refiner(models[1], load_clip_tokenizer(), CPU, torch.float32)
    context, pooled = refiner.encode("a photo of a cat")
    want_context, want_pooled = reference(pipe, "a photo of a cat")
    torch.testing.assert_close(context, want_context[:, L_WIDTH:], rtol=0, atol=TOL)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="text_projection"):
        SDXLPromptEncoder.refiner(models[0], load_clip_tokenizer(), CPU, torch.float32)  # type: ignore[arg-type]


def _rows(model, words: str) -> torch.Tensor:
    ids = load_clip_tokenizer().encode(words)
    return model.get_input_embeddings().weight[ids].detach().clone()


def test_two_part_embeddings_encode_like_their_words(encoder, models) -> None:
    file = AdapterFile("zorblax", "/nowhere/zorblax.safetensors")
    parts = {"clip_l": Embedding("zorblax", _rows(models[0], "red cube"), file),
             "clip_g": Embedding("zorblax", _rows(models[1], "red cube"), file)}
    got = encoder.encode("a photo of (zorblax:1.2)", embeddings={"zorblax": parts})
    want = encoder.encode("a photo of (red cube:1.2)")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # the pooled output sees them too
    with pytest.raises(AdapterError, match="no clip_g vectors"):
        encoder.encode("zorblax", embeddings={"zorblax": {"clip_l": parts["clip_l"]}})
    uneven = {"clip_l": parts["clip_l"], "clip_g": Embedding("zorblax", _rows(models[1], "red"), file)}
    with pytest.raises(AdapterError, match="different vector counts"):
        encoder.encode("zorblax", embeddings={"zorblax": uneven})

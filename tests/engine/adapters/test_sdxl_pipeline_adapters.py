"""SDXL LoRAs and embeddings through the pipeline: an embedding of some words renders exactly like those words (in
either prompt); a LoRA over both text encoders and the U-Net changes the image and leaving it gives the base back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from engine.adapters.refs import AdapterFile, LoraUse
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import write_random
from tests.engine.adapters.lora_testfiles import gen, kohya, lora_module, write

@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path]:
    folder = tmp_path_factory.mktemp("xl")
    return Pipeline.load(write_random(folder / "xl.safetensors", "sdxl", seed=3), device="cpu", dtype="float32"), folder


def render(pipe: Pipeline, prompt: str, negative: str = "", embeddings: tuple = (), loras: tuple = ()) -> np.ndarray:
    tags = "".join(f" <lora:{u.file.name}:{u.unet:g}>" for u in loras)
    r = GenerationRequest(prompt=prompt + tags, negative_prompt=negative, width=64, height=64, steps=3, cfg_scale=5.0,
                          seed=7, embeddings=embeddings, loras=loras)
    return np.asarray(pipe.generate([r])[0].image, dtype=np.int16)


def test_sdxl_embedding_renders_like_its_words(xl: tuple[Pipeline, Path]) -> None:
    pipe, folder = xl
    m = pipe.models
    ids = m.tokenizer.encode("red cube")
    rows = {"clip_l": m.text_encoder.get_input_embeddings().weight[ids],
            "clip_g": m.text_encoder_2.get_input_embeddings().weight[ids]}  # type: ignore[union-attr]
    save_file({k: v.detach().clone().contiguous() for k, v in rows.items()}, str(folder / "zorblax.safetensors"))
    emb = AdapterFile("zorblax", str(folder / "zorblax.safetensors"))
    got = render(pipe, "a zorblax on a table", "zorblax, blurry", (emb,))
    want = render(pipe, "a red cube on a table", "red cube, blurry")
    assert np.array_equal(got, want)
    assert not np.array_equal(render(pipe, "a zorblax on a table", "blurry"), want)


def test_sdxl_lora_changes_the_image_and_leaves_no_trace(xl: tuple[Pipeline, Path]) -> None:
    pipe, folder = xl
    g = gen(1)
    t = {**lora_module(kohya("te1", "text_model.encoder.layers.1.self_attn.q_proj"), g, 16, 16, 4, scale=0.5),
         **lora_module(kohya("te2", "text_model.encoder.layers.1.self_attn.q_proj"), g, 32, 32, 4, scale=0.5),
         **lora_module(kohya("unet", "input_blocks.5.1.transformer_blocks.1.attn2.to_k"), g, 64, 48, 4, scale=0.5)}
    lora = LoraUse(AdapterFile("xl-lora", str(write(folder / "xl-lora.safetensors", t))), te=1.0, unet=1.0)
    base = render(pipe, "a red cube on a table")
    assert not np.array_equal(render(pipe, "a red cube on a table", loras=(lora,)), base)
    assert np.array_equal(render(pipe, "a red cube on a table"), base)

"""SDXL embeddings: a clip_l/clip_g file holding the input embeddings of some words, taken from both text encoders
of a tiny SDXL checkpoint, encodes exactly like those words (context and pooled output); each part's width is
checked against its encoder, and a one-part SD 1.x/2.x embedding is refused on SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.adapters.embeddings import Embedding, encoder_widths, read_model_embedding, read_sdxl_embedding
from engine.adapters.refs import AdapterError
from engine.conditioning import SDXLPromptEncoder
from engine.loading import LoadedModels, load_checkpoint
from engine.random_checkpoint import write_random
from tests.engine.adapters.test_embeddings import adapter, write_kohya

NAME = "zorblax"
WORDS = "red cube"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> LoadedModels:
    return load_checkpoint(write_random(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors", "sdxl", seed=4))


@pytest.fixture(scope="module")
def encoder(models: LoadedModels) -> SDXLPromptEncoder:
    assert models.text_encoder_2 is not None
    return SDXLPromptEncoder.base(models.text_encoder, models.text_encoder_2, models.tokenizer, models.device,
                                  models.dtype)  # type: ignore[arg-type]


def rows(models: LoadedModels, words: str) -> dict[str, torch.Tensor]:
    """Each encoder's own input embeddings of ``words``."""
    ids = models.tokenizer.encode(words)
    encoders = {"clip_l": models.text_encoder, "clip_g": models.text_encoder_2}
    return {part: m.get_input_embeddings().weight[ids].detach().clone() for part, m in encoders.items()}  # type: ignore[union-attr]


def write_sdxl(path: Path, parts: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in parts.items()}, str(path))
    return path


def test_widths_of_an_sdxl_model(models: LoadedModels) -> None:
    assert encoder_widths(models) == {"clip_l": 16, "clip_g": 32}


def test_sdxl_embedding_encodes_exactly_like_its_words(models: LoadedModels, encoder: SDXLPromptEncoder, tmp_path: Path) -> None:
    path = write_sdxl(tmp_path / f"{NAME}.safetensors", rows(models, WORDS))
    parts = read_sdxl_embedding(adapter(path), widths=encoder_widths(models))
    assert set(parts) == {"clip_l", "clip_g"} and all(isinstance(e, Embedding) and e.name == NAME for e in parts.values())
    assert read_model_embedding(adapter(path), encoder_widths(models)).keys() == parts.keys()  # type: ignore[union-attr]
    prompts = [f"a photo of ({NAME}:1.2), studio light", f"{NAME} on a table"]
    words = [p.replace(NAME, WORDS) for p in prompts]
    got_c, got_p = encoder.encode_batch(prompts, [1, 2], [{NAME: parts}, {NAME: parts}])
    want_c, want_p = encoder.encode_batch(words, [1, 2])
    assert torch.equal(got_c, want_c)
    assert torch.equal(got_p, want_p)
    # Without the vectors (placeholders only) the result is something else: the test can fail.
    bare_c, _ = encoder.encode_batch(prompts, [1, 2])
    assert not torch.equal(bare_c, want_c)
    # A batch where only one prompt uses the embedding.
    got_c, got_p = encoder.encode_batch([prompts[0], words[1]], [1, 1], [{NAME: parts}, None])
    want_c, want_p = encoder.encode_batch([words[0], words[1]], [1, 1])
    assert torch.equal(got_c, want_c) and torch.equal(got_p, want_p)


def test_part_widths_are_checked_naming_the_file_and_both_widths(models: LoadedModels, tmp_path: Path) -> None:
    r = rows(models, WORDS)
    swapped = write_sdxl(tmp_path / "swapped.safetensors", {"clip_l": r["clip_g"], "clip_g": r["clip_l"]})
    with pytest.raises(AdapterError, match=r"clip_l vectors are 32 wide but this model's CLIP-L text encoder is 16 wide") as err:
        read_sdxl_embedding(adapter(swapped), widths=encoder_widths(models))
    assert "swapped.safetensors" in str(err.value) and "clip_l 16 + clip_g 32" in str(err.value)
    wrong_g = write_sdxl(tmp_path / "wide.safetensors", {"clip_l": r["clip_l"], "clip_g": torch.zeros(2, 1280)})
    with pytest.raises(AdapterError, match=r"wide\.safetensors.*clip_g vectors are 1280 wide .* bigG text encoder is 32 wide"):
        read_sdxl_embedding(adapter(wrong_g), widths=encoder_widths(models))


def test_one_part_embedding_is_refused_on_sdxl_and_sdxl_one_on_sd1(models: LoadedModels, tmp_path: Path) -> None:
    sd1 = write_kohya(tmp_path / "old.safetensors", torch.zeros(2, 768))
    with pytest.raises(AdapterError, match=r"old\.safetensors: the embedding is for SD 1\.x/2\.x .*768 wide \(SD 1\.x\)"):
        read_model_embedding(adapter(sd1), encoder_widths(models))
    xl = write_sdxl(tmp_path / "xl.safetensors", rows(models, WORDS))
    with pytest.raises(AdapterError, match=r"xl\.safetensors: the embedding is for SDXL"):
        read_model_embedding(adapter(xl), {"": 768})


def test_refiner_takes_the_clip_g_part_alone(models: LoadedModels, tmp_path: Path) -> None:
    path = write_sdxl(tmp_path / f"{NAME}.safetensors", rows(models, WORDS))
    parts = read_sdxl_embedding(adapter(path), widths={"clip_g": 32})
    assert list(parts) == ["clip_g"] and parts["clip_g"].vectors.shape == (2, 32)

"""Pivotal tuning: the LoRA trainer trains the trigger as an embedding's vectors alongside the LoRA, and the two files
it exports give a prompt exactly what training saw."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.adapters.embeddings import describe_embedding, read_embedding
from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import AdapterFile, LoraUse
from engine.conditioning import PromptEncoder
from engine.loading import load_checkpoint
from engine.random_checkpoint import write_random
from engine.text_encoder import text_transformer
from engine.training.caption_encoding import encode_captions, family_encoding
from engine.training.embedding_trainer import initial_vectors
from engine.training.lora_export import export_lora, export_pivotal_embedding
from engine.training.lora_trainer import LoraTrainingConfig, train_lora
from tests.engine.training.helpers import Killed, kill_at, product_images

CONFIG = LoraTrainingConfig(rank=4, resolution=128, steps=6, batch_size=2, save_every=2, lr=1e-3, text_lr=1e-3, seed=3,
                            pivotal_vectors=2, pivotal_lr=1e-2)
TOKEN = "zwx-brand"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return product_images(tmp_path_factory.mktemp("product"), [(192, 144), (144, 192), (160, 160)],
                          "zwx bottle, on a table", min_side=128)


@pytest.fixture(scope="module")
def trained(models, images, tmp_path_factory: pytest.TempPathFactory):
    return train_lora(models, images, CONFIG, state_dir=tmp_path_factory.mktemp("state"), token=TOKEN)


def test_the_trigger_vectors_train_from_the_class_word(models, images, trained) -> None:
    start = initial_vectors(models.text_encoder, models.tokenizer, "bottle", 2)
    assert trained.token == TOKEN and trained.vectors is not None and trained.vectors.shape == start.shape
    assert (trained.vectors - start).abs().max() > 1e-3  # they moved
    assert any(v.abs().sum() > 0 for k, v in trained.network.state_dict().items() if "up" in k)  # and the LoRA trained
    table = text_transformer(models.text_encoder).embeddings.token_embedding.weight
    assert not table.requires_grad  # the tokenizer's own table is frozen: only the new vectors learn


def test_killed_run_resumes_to_identical_weights_and_vectors(models, images, trained, tmp_path: Path) -> None:
    seen: list[int] = []
    with pytest.raises(Killed):
        train_lora(models, images, CONFIG, state_dir=tmp_path, on_step=kill_at(5, seen), token=TOKEN)
    resumed = train_lora(models, images, CONFIG, state_dir=tmp_path, token=TOKEN)
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.vectors, trained.vectors)
    a, b = trained.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another name is another training: the state folder refuses it.
    with pytest.raises(ValueError, match="different training"):
        train_lora(models, images, CONFIG, state_dir=tmp_path, token="zwx-other")


def test_exported_pair_gives_prompts_what_training_saw(models, images, trained, tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    lora = export_lora(tmp_path / "zwx.safetensors", trained, models, images, CONFIG, licence="CC-BY-4.0")
    emb_path = export_pivotal_embedding(tmp_path / f"{TOKEN}.safetensors", trained, models, images, CONFIG,
                                        lora_name=lora.name, licence="CC-BY-4.0")
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["adforge.pivotal_embedding"] == TOKEN and meta["adforge.pivotal_vectors"] == "2"
    info = describe_embedding(emb_path)
    assert (info.vectors, info.width, info.format) == (2, models.text_encoder.config.hidden_size, "kohya")
    with safe_open(str(emb_path), "pt") as f:
        assert f.metadata()["adforge.lora"] == "zwx.safetensors"

    caption = f"{TOKEN} bottle, on a table"
    # What training fed the U-Net: the LoRA attached, the trained vectors in place of the name.
    emb = read_embedding(AdapterFile(TOKEN, str(emb_path)), width=models.text_encoder.config.hidden_size)
    assert torch.equal(emb.vectors, trained.vectors)
    trained.network.attach()
    try:
        with torch.no_grad():
            seen = encode_captions(models.text_encoder, models.tokenizer, family_encoding(models), [caption],
                                   embeddings={TOKEN: emb})[0]
    finally:
        trained.network.detach()
    # What a render gets: the LoRA file merged at weight 1 and the embedding file named in the prompt.
    merged = load_checkpoint(tiny_checkpoint)
    LoraMerger(merged).activate([LoraUse(AdapterFile(lora.stem, str(lora)))])
    encoder = PromptEncoder(merged.text_encoder, merged.tokenizer, merged.device, merged.dtype,
                            encoding=family_encoding(merged))
    rendered = encoder.encode(caption, embeddings={TOKEN: emb})
    # The LoRA file is float16: equal to that rounding.
    assert (rendered - seen).abs().max() < 2e-2 * seen.abs().max()
    without = encoder.encode("bottle, on a table")
    assert (rendered[:8] - without[:8]).abs().max() > 1e-2  # the name is what differs


def test_bad_names_and_families_are_refused(models, images, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the embedding's name"):
        train_lora(models, images, CONFIG, state_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="ordinary word"):
        train_lora(models, images, CONFIG, state_dir=tmp_path / "b", token="bottle")
    with pytest.raises(ValueError, match="pivotal_vectors"):
        train_lora(models, images, replace(CONFIG, pivotal_vectors=80), state_dir=tmp_path / "c", token=TOKEN)
    sdxl = load_checkpoint(write_random(tmp_path / "xl.safetensors", family="sdxl"))
    with pytest.raises(ValueError, match="SDXL"):
        train_lora(sdxl, images, CONFIG, state_dir=tmp_path / "d", token=TOKEN)
    no_pivot = train_lora(models, images, replace(CONFIG, pivotal_vectors=0, steps=1), state_dir=tmp_path / "e")
    with pytest.raises(ValueError, match="without pivotal tuning"):
        export_pivotal_embedding(tmp_path / f"{TOKEN}.safetensors", no_pivot, models, images, CONFIG, lora_name="x")


def test_diffusers_loads_the_pair_with_the_same_effect(models, images, trained, tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    """The two files in diffusers' own loaders (load_lora_weights + load_textual_inversion) condition and denoise
    as ours do: what users of other tools get from a pivotal-tuned product."""
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    import copy

    from tests.engine.adapters.test_lora_diffusers_parity import diffusers_pipeline

    lora = export_lora(tmp_path / "zwx.safetensors", trained, models, images, CONFIG)
    emb_path = export_pivotal_embedding(tmp_path / f"{TOKEN}.safetensors", trained, models, images, CONFIG,
                                        lora_name=lora.name)
    pipe = diffusers_pipeline(models, lora)
    tokenizer = copy.deepcopy(models.tokenizer._hf)
    pipe.tokenizer = tokenizer
    pipe.load_textual_inversion(str(emb_path), token=TOKEN)
    prompt = f"{TOKEN} bottle, on a table"
    converted = pipe.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    merged = load_checkpoint(tiny_checkpoint)
    LoraMerger(merged).activate([LoraUse(AdapterFile(lora.stem, str(lora)))])
    emb = read_embedding(AdapterFile(TOKEN, str(emb_path)), width=models.text_encoder.config.hidden_size)
    with torch.no_grad():
        ref = pipe.text_encoder(ids)[0][0]
        ours = PromptEncoder(merged.text_encoder, merged.tokenizer, merged.device, merged.dtype,
                             encoding=family_encoding(merged)).encode(prompt, embeddings={TOKEN: emb})
        assert (ours.float() - ref.float()).abs().max() < 1e-3 * ref.abs().max()
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
        ref_eps = pipe.unet(x, torch.tensor([400.0]), encoder_hidden_states=ref[None]).sample
        ours_eps = merged.unet(x, torch.tensor([400.0]), ours[None])
    assert (ours_eps - ref_eps).abs().max() / ref_eps.abs().max() < 1e-3

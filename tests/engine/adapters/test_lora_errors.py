"""LoRA files that cannot be used are refused with the file and key named, before any weight changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import AdapterError, AdapterFile, LoraUse
from engine.loading import load_checkpoint
from tests.engine.adapters.lora_testfiles import ATTN, TE_LAYER, differing, gen, kohya, lora_module, randn, snapshot, write


class NotAWeight:
    """Pickled by reference: weights-only unpickling must refuse it."""

    def __reduce__(self):
        return (print, ("this would run",))


@pytest.fixture
def models(tiny_checkpoint: Path):
    return load_checkpoint(tiny_checkpoint)


def refused(models, path: Path, match: str) -> AdapterError:
    before = snapshot(models)
    merger = LoraMerger(models)
    with pytest.raises(AdapterError, match=match) as exc:
        merger.activate([LoraUse(AdapterFile(path.stem, str(path)))])
    assert str(path) in str(exc.value)
    assert differing(models, before) == []
    assert merger.active == ()
    return exc.value


def test_an_sdxl_lora_names_sdxl(tmp_path: Path, models) -> None:
    g = gen(1)
    t = {**lora_module(kohya("te1", f"{TE_LAYER}.self_attn.q_proj"), g, 32, 32, 2),
         **lora_module(kohya("te2", f"{TE_LAYER}.self_attn.q_proj"), g, 32, 32, 2),
         **lora_module(kohya("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"), g, 32, 32, 2)}
    err = refused(models, write(tmp_path / "xl.safetensors", t), "SDXL")
    assert "SD 1.x" in str(err)
    # The training metadata alone says so too.
    meta_only = write(tmp_path / "xl-meta.safetensors", lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2),
                      {"ss_base_model_version": "sdxl_base_v1-0"})
    refused(models, meta_only, "for SDXL models")


def test_an_sd2_lora_names_sd2(tmp_path: Path, models) -> None:
    g = gen(2)
    v2 = write(tmp_path / "v2.safetensors", lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2), {"ss_v2": "True"})
    refused(models, v2, r"for SD 2\.x models")
    wide = write(tmp_path / "wide.safetensors", lora_module(kohya("te", f"{TE_LAYER}.self_attn.q_proj"), g, 1024, 1024, 2))
    refused(models, wide, r"SD 2\.x")


def test_a_key_matching_no_module_names_file_and_key(tmp_path: Path, models) -> None:
    g = gen(3)
    t = {**lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2),
         **lora_module(kohya("unet", "down_blocks.0.attentions.0.transformer_blocks.3.attn1.to_q"), g, 32, 32, 2)}
    err = refused(models, write(tmp_path / "deep.safetensors", t), "matches no U-Net module")
    assert err.key == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_3_attn1_to_q.lora_down.weight"
    te = write(tmp_path / "te.safetensors", lora_module(kohya("te", "text_model.encoder.layers.5.mlp.fc1"), g, 37, 32, 2))
    refused(models, te, "matches no text encoder module")


def test_an_unknown_key_names_file_and_key(tmp_path: Path, models) -> None:
    g = gen(4)
    t = {**lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2), "lora_unet_x.something_else": randn(g, 2)}
    err = refused(models, write(tmp_path / "odd.safetensors", t), "unknown key")
    assert err.key == "lora_unet_x.something_else"
    dora = {**lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2), f"{kohya('unet', f'{ATTN}.attn1.to_q')}.dora_scale": randn(g, 32, 1)}
    refused(models, write(tmp_path / "dora.safetensors", dora), "DoRA")
    half = {f"{kohya('unet', f'{ATTN}.attn1.to_q')}.lora_down.weight": randn(g, 2, 32)}
    refused(models, write(tmp_path / "half.safetensors", half), "no lora_up.weight tensor")


def test_a_shape_mismatch_names_file_and_key(tmp_path: Path, models) -> None:
    g = gen(5)
    stem = kohya("unet", f"{ATTN}.attn2.to_k")
    err = refused(models, write(tmp_path / "shape.safetensors", lora_module(stem, g, 32, 48, 2)), "does not fit")
    assert err.key == f"{stem}.lora_down.weight" and "(32, 48)" in str(err)
    inner = {f"{stem}.lora_down.weight": randn(g, 2, 32), f"{stem}.lora_up.weight": randn(g, 32, 3)}
    err = refused(models, write(tmp_path / "rank.safetensors", inner), "does not match lora_down")
    assert err.key == f"{stem}.lora_up.weight"


def test_a_truncated_file_is_refused(tmp_path: Path, models) -> None:
    g = gen(6)
    path = write(tmp_path / "cut.safetensors", lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    refused(models, path, "truncated")


def test_pickles_are_read_weights_only(tmp_path: Path, models) -> None:
    g = gen(7)
    t = lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2)
    evil = tmp_path / "evil.pt"
    torch.save({**t, "payload": NotAWeight()}, evil)
    refused(models, evil, "weights-only")
    plain = tmp_path / "plain.pt"
    torch.save(t, plain)
    before = snapshot(models)
    LoraMerger(models).activate([LoraUse(AdapterFile("plain", str(plain)))])
    assert differing(models, before) == ["unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]


def test_a_checkpoint_given_as_a_lora_is_refused(tiny_checkpoint: Path, models) -> None:
    refused(models, tiny_checkpoint, "checkpoint, not a LoRA")

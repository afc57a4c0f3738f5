"""describe_lora (what `adforge models inspect` shows) and telling LoRA files from other model files by keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.adapters.lora_file import describe_lora, is_lora_file, open_lora
from engine.adapters.refs import AdapterError
from tests.engine.adapters.lora_testfiles import ATTN, TE_LAYER, gen, kohya, lora_module, randn, write


def test_describe_a_kohya_lora_with_training_metadata(tmp_path: Path) -> None:
    g = gen(1)
    t = {**lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 8, alpha=4.0),
         **lora_module(kohya("unet", f"{ATTN}.attn1.to_k"), g, 32, 32, 8, alpha=4.0),
         **lora_module(kohya("unet", "down_blocks.0.attentions.0.proj_in"), g, 32, 32, 4, kernel=1, alpha=1.0),
         **lora_module(kohya("te", f"{TE_LAYER}.mlp.fc1"), g, 37, 32, 4, alpha=1.0)}
    tags = {"10_castle": {"castle": 40, "sky": 12, " tower": 30}, "5_misc": {"sky": 20, **{f"tag{i}": 1 for i in range(30)}}}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps(tags), "other": "not training metadata",
            "ss_dataset_dirs": "x" * 1000}
    info = describe_lora(write(tmp_path / "castle.safetensors", t, meta))
    assert info.format == "kohya LoRA"
    assert (info.family, info.family_label) == ("sd1", "SD 1.x")
    assert info.ranks == (4, 8) and info.alphas == (1.0, 4.0)
    assert (info.unet_modules, info.text_encoder_modules) == (3, 1)
    assert kohya("unet", f"{ATTN}.attn1.to_q") in info.modules and len(info.modules) == 4
    assert info.metadata["ss_network_module"] == "networks.lora" and "other" not in info.metadata
    assert info.metadata["ss_tag_frequency"].startswith("castle (40), sky (32), tower (30), tag0 (1)")
    assert info.metadata["ss_tag_frequency"].count("(") == 10
    assert len(info.metadata["ss_dataset_dirs"]) < 310


def test_formats_are_named(tmp_path: Path) -> None:
    g = gen(2)
    conv = lora_module(kohya("unet", "down_blocks.0.resnets.0.conv1"), g, 32, 32, 4, kernel=3)
    lin = lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 4)
    assert describe_lora(write(tmp_path / "locon.safetensors", {**conv, **lin})).format == "LoCon"
    q = kohya("unet", f"{ATTN}.attn1.to_q")
    loha = {f"{q}.hada_w1_a": randn(g, 32, 2), f"{q}.hada_w1_b": randn(g, 2, 32), f"{q}.hada_w2_a": randn(g, 32, 2),
            f"{q}.hada_w2_b": randn(g, 2, 32), f"{q}.alpha": torch.tensor(1.0)}
    info = describe_lora(write(tmp_path / "loha.safetensors", loha))
    assert (info.format, info.ranks, info.alphas) == ("LoHa", (2,), (1.0,))
    lokr = {f"{q}.lokr_w1": randn(g, 4, 4), f"{q}.lokr_w2": randn(g, 8, 8)}
    info = describe_lora(write(tmp_path / "lokr.safetensors", lokr))
    assert (info.format, info.ranks, info.alphas) == ("LoKr", (), ())
    full = {f"{q}.diff": randn(g, 32, 32)}
    assert describe_lora(write(tmp_path / "full.safetensors", full)).format == "LyCORIS full"
    peft = {f"unet.{ATTN}.attn1.to_q.lora_A.weight": randn(g, 4, 32), f"unet.{ATTN}.attn1.to_q.lora_B.weight": randn(g, 32, 4),
            f"text_encoder.{TE_LAYER}.mlp.fc1.lora_A.weight": randn(g, 4, 32),
            f"text_encoder.{TE_LAYER}.mlp.fc1.lora_B.weight": randn(g, 37, 4)}
    info = describe_lora(write(tmp_path / "peft.safetensors", peft,
                               {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "text_encoder.lora_alpha": 2})}))
    assert (info.format, info.ranks, info.alphas) == ("diffusers-PEFT", (4,), (2.0, 8.0))
    assert (info.unet_modules, info.text_encoder_modules) == (1, 1)


def test_family_from_keys_shapes_and_metadata(tmp_path: Path) -> None:
    g = gen(3)
    cases = {
        "sdxl": ({**lora_module(kohya("te1", f"{TE_LAYER}.mlp.fc1"), g, 37, 32, 2)}, {}),
        "sd2": ({**lora_module(kohya("unet", f"{ATTN}.attn2.to_k"), g, 320, 1024, 2)}, {}),
        "sd1": ({**lora_module(kohya("unet", f"{ATTN}.attn2.to_k"), g, 320, 768, 2)}, {}),
    }
    for i, (family, (t, meta)) in enumerate(cases.items()):
        assert open_lora(write(tmp_path / f"{i}.safetensors", t, meta)).family.name == family
    xl_unet = lora_module(kohya("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"), g, 640, 2048, 2)
    assert open_lora(write(tmp_path / "xl.safetensors", xl_unet)).family.label == "SDXL"


def test_sniffing_tells_loras_from_checkpoints_and_embeddings(tmp_path: Path, tiny_checkpoint: Path) -> None:
    g = gen(4)
    assert is_lora_file(write(tmp_path / "lora.safetensors", lora_module(kohya("unet", f"{ATTN}.attn1.to_q"), g, 32, 32, 2)))
    peft = {f"unet.{ATTN}.attn1.to_q.lora_A.weight": randn(g, 4, 32), f"unet.{ATTN}.attn1.to_q.lora_B.weight": randn(g, 32, 4)}
    assert is_lora_file(write(tmp_path / "peft.safetensors", peft))
    q = kohya("unet", f"{ATTN}.attn1.to_q")
    assert is_lora_file(write(tmp_path / "lokr.safetensors", {f"{q}.lokr_w1": randn(g, 4, 4), f"{q}.lokr_w2": randn(g, 8, 8)}))
    assert not is_lora_file(tiny_checkpoint)
    assert not is_lora_file(write(tmp_path / "emb.safetensors", {"emb_params": randn(g, 2, 768)}))
    assert not is_lora_file(write(tmp_path / "xl-emb.safetensors", {"clip_l": randn(g, 2, 768), "clip_g": randn(g, 2, 1280)}))
    a1111 = tmp_path / "a1111-emb.pt"
    torch.save({"string_to_param": {"*": randn(g, 2, 768)}, "name": "thing", "step": 100}, a1111)
    assert not is_lora_file(a1111)
    pt = tmp_path / "lora.pt"
    torch.save(lora_module(q, g, 32, 32, 2), pt)
    assert is_lora_file(pt)
    with pytest.raises(AdapterError, match="not a safetensors file"):
        is_lora_file(_junk(tmp_path))


def _junk(folder: Path) -> Path:
    path = folder / "junk.safetensors"
    path.write_bytes(b"<html>not found</html>")
    return path

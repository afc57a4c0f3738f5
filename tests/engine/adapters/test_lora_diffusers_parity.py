"""Our merge against diffusers' own LoRA loader (PEFT-backed), module by module, on the same random weights.

diffusers gets the tiny checkpoint's U-Net through its single-file converter and a copy of our text encoder (both
are transformers' CLIPTextModel), loads the very same LoRA file with ``load_lora_weights`` and fuses it with
``fuse_lora(lora_scale=s)``; its fused U-Net is compared with ours converted by the same converter.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from engine.adapters.lora_merge import LoraMerger  # noqa: E402
from engine.adapters.refs import AdapterFile, LoraUse  # noqa: E402
from engine.checkpoint import UNET_PREFIX  # noqa: E402
from engine.loading import load_checkpoint  # noqa: E402
from tests.engine.adapters.lora_testfiles import ATTN, TE_LAYER, gen, kohya, lora_module, randn, write  # noqa: E402
from tests.engine.test_unet_parity import diffusers_config  # noqa: E402

TOL = 1e-5


def diffusers_pipeline(models, path: Path):
    """diffusers' StableDiffusionPipeline (U-Net and text encoder only) on base weights equal to ``models``', with the
    LoRA file ``path`` loaded by diffusers' own loader."""
    cfg = diffusers_config(models.unet.config)
    unet = diffusers.UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in models.unet.state_dict().items()}, cfg))
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=copy.deepcopy(models.text_encoder), tokenizer=None,
                                             unet=unet, scheduler=None, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return pipe


def diffusers_fused(models, path: Path, scale: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(U-Net, text encoder) state dicts after diffusers loaded ``path`` into base weights equal to ``models``'."""
    pipe = diffusers_pipeline(models, path)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


def ours(tiny_checkpoint: Path, path: Path, scale: float):
    """(our merged U-Net in diffusers names, our merged text encoder, the models, their base state dicts)."""
    models = load_checkpoint(tiny_checkpoint)
    base = (copy.deepcopy(models.unet.state_dict()), copy.deepcopy(models.text_encoder.state_dict()))
    LoraMerger(models).activate([LoraUse(AdapterFile(path.stem, str(path)), te=scale, unet=scale)])
    cfg = diffusers_config(models.unet.config)
    unet = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in models.unet.state_dict().items()}, cfg)
    return unet, models.text_encoder.state_dict(), models, base


def compare(tiny_checkpoint: Path, path: Path, scale: float, expect_changed: int) -> None:
    unet, te, models, (base_unet, base_te) = ours(tiny_checkpoint, path, scale)
    ref_unet, ref_te = diffusers_fused(load_checkpoint(tiny_checkpoint), path, scale)
    assert set(unet) == set(ref_unet)
    for name, ref in ref_unet.items():
        assert (unet[name] - ref).abs().max() < TOL, name
    for name, ref in ref_te.items():
        if name == "embeddings.position_ids":
            continue
        assert (te[name] - ref).abs().max() < TOL, name
    changed = sum(not torch.equal(v, base_te[k]) for k, v in te.items()) + sum(
        not torch.equal(v, base_unet[k]) for k, v in models.unet.state_dict().items())
    assert changed == expect_changed  # the comparison covered real changes, not two untouched models


def test_kohya_file_matches_diffusers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    g = gen(21)
    t: dict[str, torch.Tensor] = {}
    n = 0
    for block, width in (("down_blocks.0.attentions.0", 32), ("up_blocks.0.attentions.1", 64)):
        tb = f"{block}.transformer_blocks.0"
        for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q"):
            t.update(lora_module(kohya("unet", f"{tb}.{m}"), g, width, width, 4, alpha=2.0))
        t.update(lora_module(kohya("unet", f"{tb}.ff.net.0.proj"), g, width * 8, width, 4, alpha=1.0))
        t.update(lora_module(kohya("unet", f"{tb}.ff.net.2"), g, width, width * 4, 8, alpha=4.0))
        t.update(lora_module(kohya("unet", f"{block}.proj_in"), g, width, width, 4, kernel=1, alpha=2.0))
        # Every module carries an alpha: for one without, kohya and A1111 use scale 1, while diffusers gives it
        # the file's most common alpha (its PEFT config has one default); the hand-merge tests cover that case.
        t.update(lora_module(kohya("unet", f"{block}.proj_out"), g, width, width, 4, kernel=1, alpha=4.0))
        n += 9
    # LoCon: 3x3 convs of resnets and a downsampler, and a 1x1 shortcut.
    t.update(lora_module(kohya("unet", "down_blocks.1.resnets.0.conv1"), g, 64, 32, 4, kernel=3, alpha=2.0))
    t.update(lora_module(kohya("unet", "mid_block.resnets.1.conv2"), g, 64, 64, 4, kernel=3, alpha=1.0))
    t.update(lora_module(kohya("unet", "down_blocks.1.resnets.0.conv_shortcut"), g, 64, 32, 4, kernel=1, alpha=1.0))
    t.update(lora_module(kohya("unet", "down_blocks.0.resnets.0.time_emb_proj"), g, 32, 128, 4, alpha=1.0))
    n += 4
    # diffusers 0.42.1 loads a kohya file's text-encoder mlp modules and its self-attention ones, but not both
    # kinds from one file (it picks one key convention per file): the attention ones have a test of their own.
    for layer in (0, 1):
        t.update(lora_module(kohya("te", f"text_model.encoder.layers.{layer}.mlp.fc1"), g, 37, 32, 4, alpha=3.0))
        t.update(lora_module(kohya("te", f"text_model.encoder.layers.{layer}.mlp.fc2"), g, 32, 37, 4, alpha=3.0))
        n += 2
    compare(tiny_checkpoint, write(tmp_path / "kohya.safetensors", t), 0.75, n)


def test_kohya_text_encoder_attention_matches_diffusers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    g = gen(22)
    t: dict[str, torch.Tensor] = {}
    for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t.update(lora_module(kohya("te", f"{TE_LAYER}.self_attn.{m}"), g, 32, 32, 4, alpha=3.0))
    t.update(lora_module(kohya("unet", f"{ATTN}.attn2.to_k"), g, 32, 32, 4, alpha=3.0))
    compare(tiny_checkpoint, write(tmp_path / "kohya-te.safetensors", t), 1.3, 5)


def test_peft_file_with_metadata_matches_diffusers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    g = gen(23)
    t: dict[str, torch.Tensor] = {}
    modules = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn1.to_out.0", f"{ATTN}.attn2.to_v", f"{ATTN}.ff.net.2",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]
    shapes = {f"{ATTN}.ff.net.2": (32, 128), "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": (64, 64)}
    for m in modules:
        out, inp = shapes.get(m, (32, 32))
        t[f"unet.{m}.lora_A.weight"], t[f"unet.{m}.lora_B.weight"] = randn(g, 4, inp), randn(g, out, 4)
    for m, (out, inp) in (("self_attn.q_proj", (32, 32)), ("self_attn.v_proj", (32, 32)), ("mlp.fc1", (37, 32))):
        key = f"text_encoder.{TE_LAYER}.{m}"
        t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = randn(g, 4, inp), randn(g, out, 4)
    # Module names as PEFT sees them in this text encoder (transformers 5: no "text_model." level).
    te_layer = TE_LAYER.removeprefix("text_model.")
    targets = {"unet": modules, "text_encoder": [f"{te_layer}.self_attn.q_proj", f"{te_layer}.self_attn.v_proj", f"{te_layer}.mlp.fc1"]}
    meta = {}
    for part, alpha in (("unet", 8), ("text_encoder", 2)):
        meta.update({f"{part}.r": 4, f"{part}.lora_alpha": alpha, f"{part}.target_modules": targets[part],
                     f"{part}.alpha_pattern": {"attn2.to_v": 16} if part == "unet" else {}, f"{part}.rank_pattern": {}})
    path = write(tmp_path / "peft.safetensors", t, {"lora_adapter_metadata": json.dumps(meta)})
    compare(tiny_checkpoint, path, 0.6, 8)

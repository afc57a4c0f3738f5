"""An SDXL kohya LoRA (te1 / te2 / LDM-named U-Net) merged by us against diffusers' StableDiffusionXLPipeline
``load_lora_weights`` + ``fuse_lora`` on the same tiny SDXL weights: U-Net (through diffusers' single-file
converter) and both text encoders (copies of ours, which are transformers' CLIP classes)."""

from __future__ import annotations

import copy
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
from engine.random_checkpoint import write_random  # noqa: E402
from tests.engine.adapters.lora_testfiles import gen, kohya, lora_module, write  # noqa: E402
from tests.engine.test_unet_parity import diffusers_config  # noqa: E402

TOL = 1e-5
DEEP = "input_blocks.5.1.transformer_blocks.1"  # depth-2 attention block of the tiny SDXL U-Net
L1 = "input_blocks.3.1.transformer_blocks.0"


def _unet_sd(models, cfg) -> dict[str, torch.Tensor]:
    return convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in models.unet.state_dict().items()}, cfg)


def test_sdxl_kohya_file_matches_diffusers(tmp_path: Path) -> None:
    ckpt = Path(write_random(tmp_path / "xl.safetensors", "sdxl", seed=6))
    models = load_checkpoint(ckpt)
    shapes = {n: m.weight.shape for n, m in models.unet.named_modules() if hasattr(m, "weight")}
    g = gen(31)
    t: dict[str, torch.Tensor] = {}
    for m in (f"{DEEP}.attn1.to_q", f"{DEEP}.attn2.to_k", f"{DEEP}.attn1.to_out.0", f"{DEEP}.ff.net.2",
              f"{L1}.attn2.to_v", "middle_block.1.transformer_blocks.1.attn1.to_v", "output_blocks.1.1.proj_in"):
        out, inp = shapes[m]
        t.update(lora_module(kohya("unet", m), g, out, inp, 4, alpha=2.0))
    te1, te2 = models.text_encoder.config.hidden_size, models.text_encoder_2.config.hidden_size  # type: ignore[union-attr]
    for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t.update(lora_module(kohya("te1", f"text_model.encoder.layers.1.self_attn.{m}"), g, te1, te1, 4, alpha=3.0))
        t.update(lora_module(kohya("te2", f"text_model.encoder.layers.2.self_attn.{m}"), g, te2, te2, 4, alpha=3.0))
    path = write(tmp_path / "xl-lora.safetensors", t, {"ss_base_model_version": "sdxl_base_v1-0"})
    scale = 0.8

    cfg = diffusers_config(models.unet.config, size_dim=256)
    unet = diffusers.UNet2DConditionModel(**cfg)
    unet.load_state_dict(_unet_sd(models, cfg))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=copy.deepcopy(models.text_encoder), text_encoder_2=copy.deepcopy(models.text_encoder_2),
        tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None, add_watermarker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()

    base = {k: v.clone() for k, v in _unet_sd(models, cfg).items()}
    base_te = [copy.deepcopy(net.state_dict()) for net in (models.text_encoder, models.text_encoder_2)]  # type: ignore[union-attr]
    LoraMerger(models).activate([LoraUse(AdapterFile(path.stem, str(path)), te=scale, unet=scale)])
    ours_unet = _unet_sd(models, cfg)
    changed = 0
    for name, ref in pipe.unet.state_dict().items():
        assert (ours_unet[name] - ref).abs().max() < TOL, name
        changed += not torch.equal(ours_unet[name], base[name])
    assert changed == 7
    for ours, ref, before in ((models.text_encoder, pipe.text_encoder, base_te[0]),
                              (models.text_encoder_2, pipe.text_encoder_2, base_te[1])):
        ref_sd = ref.state_dict()
        n = 0
        for name, value in ours.state_dict().items():  # type: ignore[union-attr]
            if name.endswith("position_ids"):
                continue
            assert (value - ref_sd[name]).abs().max() < TOL, name
            n += not torch.equal(value, before[name])
        assert n == 4  # q, k, v, out of one layer: the comparison covered real changes

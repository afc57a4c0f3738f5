"""LoRAs for the SDXL refiner's part of a base + refiner render: merged into the refiner only while it finishes the
image, with the same pixels as a refiner file whose weights were merged by hand; base LoRAs are refused on it
naming both families; the infotext names them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.adapters.lora_file import describe_lora
from engine.adapters.refs import AdapterError, AdapterFile, LoraUse
from engine.checkpoint import UNET_PREFIX, file_sha256
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import write_random
from tests.adapter_files import write_kohya_lora
from tests.engine.adapters.lora_testfiles import gen, kohya, lora_delta, lora_module, write

pytest.importorskip("diffusers")  # the refiner writer below lives in a diffusers parity test module
from tests.engine.test_sdxl_refiner import _write_refiner  # noqa: E402

REFINER_ARCH = {"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}
# Modules of the tiny refiner U-Net (LDM names, as kohya writes SDXL-family files).
MODULES = ("input_blocks.5.1.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn1.to_q",
           "output_blocks.0.1.proj_out")
SIZE, STEPS, SWITCH = 64, 4, 0.25


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refiner-loras")
    base = Path(write_random(root / "sdxl.safetensors", "sdxl", seed=5))
    refiner = _write_refiner(root / "refiner.safetensors")
    sd = load_file(str(refiner))
    g = gen(7)
    tensors: dict[str, torch.Tensor] = {}
    for path in MODULES:
        w = sd[f"{UNET_PREFIX}{path}.weight"]
        tensors.update(lora_module(kohya("unet", path), g, w.shape[0], w.shape[1], 2, alpha=2.0, scale=4.0,
                                   kernel=1 if w.ndim == 4 else 0))
    lora = write(root / "refiner-detail.safetensors", tensors, REFINER_ARCH)
    # The same LoRA merged into the refiner's weights by hand: W + (alpha / r) up @ down.
    merged = dict(sd)
    for path in MODULES:
        key = f"{UNET_PREFIX}{path}.weight"
        merged[key] = (sd[key].double() + lora_delta(tensors, kohya("unet", path), sd[key].shape)).to(sd[key].dtype)
    hand = root / "refiner-merged.safetensors"
    with safe_open(str(refiner), "pt") as f:  # the head counts of our tiny shapes live in the metadata
        save_file(merged, str(hand), metadata=f.metadata())
    base_lora = write_kohya_lora(root / "base-style.safetensors", base, text_encoder=False,
                                 metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return {"base": base, "refiner": refiner, "lora": lora, "hand": hand, "base_lora": base_lora}


def _pipe(base: Path, refiner: Path) -> Pipeline:
    pipe = Pipeline.load(base, device="cpu", dtype="float32")
    pipe.refiner = Pipeline.load(refiner, device="cpu", dtype="float32")
    return pipe


def _request(**kw) -> GenerationRequest:
    return GenerationRequest(prompt="a red bottle on a beach", negative_prompt="blurry", seed=3, width=SIZE, height=SIZE,
                             steps=STEPS, cfg_scale=5.0, sampler="Euler", refiner_switch=SWITCH, **kw)


def _pixels(results) -> np.ndarray:
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in results])


def test_a_refiner_lora_is_detected_as_one(files: dict[str, Path]) -> None:
    assert describe_lora(files["lora"]).family == "sdxl-refiner"
    assert describe_lora(files["base_lora"]).family == "sdxl"


def test_refiner_lora_renders_what_the_hand_merged_refiner_renders(files: dict[str, Path]) -> None:
    use = LoraUse(AdapterFile("refiner-detail", files["lora"], file_sha256(files["lora"])), 1.0, 1.0)
    pipe = _pipe(files["base"], files["refiner"])
    plain = _pixels(pipe.generate([_request()]))
    with_lora = pipe.generate([_request(refiner_loras=(use,))])
    hand = _pixels(_pipe(files["base"], files["hand"]).generate([_request()]))
    ours = _pixels(with_lora)
    assert int(np.abs(ours - hand).max()) <= 1
    assert int(np.abs(ours - plain).max()) > 3  # the LoRA changes the picture: the comparison has signal
    # The base model's own pass never saw it: without a refiner pass the LoRA changes nothing.
    assert pipe.active_lora_key == ()
    again = _pixels(pipe.generate([_request()]))
    assert np.array_equal(again, plain)  # the refiner went back to its base weights
    p = with_lora[0].parameters
    assert p["Refiner loras"] == "refiner-detail: 1"
    assert p["Lora hashes"] == f"refiner-detail: {use.file.short_hash}"


def test_a_base_lora_is_refused_on_the_refiner_naming_both_families(files: dict[str, Path]) -> None:
    pipe = _pipe(files["base"], files["refiner"])
    use = LoraUse(AdapterFile("base-style", files["base_lora"]), 1.0, 1.0)
    with pytest.raises(AdapterError, match="for SDXL models; the loaded model is SDXL refiner"):
        pipe.generate([_request(refiner_loras=(use,))])


def test_refiner_loras_need_a_refiner_pass(files: dict[str, Path]) -> None:
    use = LoraUse(AdapterFile("refiner-detail", files["lora"]), 1.0, 1.0)
    with pytest.raises(ValueError, match="refiner LoRAs need a refiner switch"):
        replace(_request(refiner_loras=(use,)), refiner_switch=None).validate()

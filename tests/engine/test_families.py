"""The family table and the sampler registry as data: rows that detection can reach, and the one-lookup rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, CheckpointError, open_state_dict
from engine.families import ANY, FAMILIES, SD1, Signature, detect_family
from engine.loading import load_checkpoint
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import TINY_UNET, random_sd1_state_dict
from engine.samplers import SAMPLERS
from engine.vae import VAEConfig


def test_rows_are_unique_and_every_row_renders() -> None:
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    assert [f.name for f in FAMILIES if f.supported] == ["sdxl-refiner", "sdxl-inpaint", "sdxl", "sd2-inpaint", "sd2", "sd1-inpaint", "sd1"]
    assert all(f.signatures for f in FAMILIES)
    assert SD1.latent_scale == VAEConfig.scaling_factor and SD1.native_size == 512
    assert {f.name: f.unet_in_channels for f in FAMILIES}["sd1-inpaint"] == 9


def test_a_signature_names_only_detected_fields() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        Signature.of(contxt_dim=ANY)


def test_sdxl_refiner_is_its_own_row_and_a_half_refiner_is_refused(tmp_path: Path) -> None:
    sd = {
        ("conditioner.embedders.0.model." + k[len(CLIP_PREFIX):] if k.startswith(CLIP_PREFIX) else k): v
        for k, v in random_sd1_state_dict(0).items()
    }
    sd[UNET_PREFIX + "label_emb.0.0.weight"] = torch.zeros(TINY_UNET.time_embed_dim, 2560)
    path = tmp_path / "refiner.safetensors"
    save_file(sd, str(path))
    found = detect_family(open_state_dict(path))
    assert found.name == "sdxl-refiner" and found.family is not None and found.supported
    # An SD 1.x file with a refiner's label_emb bolted on is no refiner: a one-line refusal naming the file.
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_a_request_sampler_name_is_looked_up_once(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.requests as pipeline_mod

    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    calls: list[str] = []
    real = pipeline_mod.get_sampler

    def counting(name: str):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(pipeline_mod, "get_sampler", counting)
    reqs = [GenerationRequest(prompt="a ball", seed=s, width=32, height=32, steps=2, sampler="euler_a") for s in (1, 2)]
    results = pipe.generate(reqs)
    assert calls == ["euler_a", "euler_a"]
    assert [r.parameters["Sampler"] for r in results] == [SAMPLERS["Euler a"].name] * 2

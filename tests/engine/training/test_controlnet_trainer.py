"""ControlNet training on the tiny random SD 1.x models: the standard initialisation leaves the U-Net's output
exactly as it was, a few steps move the weights, a killed run resumes to the very weights of an uninterrupted one,
and the written file loads as a ControlNet for its model, with the base file's licence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from engine.controlnet_loading import load_controlnet
from engine.loading import load_checkpoint
from engine.random_checkpoint import write_random_sd1
from engine.training.controlnet_trainer import (
    ControlNetTrainingConfig, ControlSample, controlnet_from_unet, controlnet_metadata, save_controlnet,
    train_controlnet,
)
from tests.engine.training.helpers import Killed, kill_at

CONFIG = ControlNetTrainingConfig(steps=6, batch_size=2, lr=1e-3, resolution=64, save_every=2, seed=5,
                                  warmup_steps=2)


def _samples(n: int = 4) -> list[ControlSample]:
    """Blocky random images, each with a white square on black as its control, at a place of its own."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST)
        control = Image.new("RGB", (64, 64))
        control.paste((255, 255, 255), (8 + 10 * i, 8, 24 + 10 * i, 24))
        out.append(ControlSample(image, control, f"a thing number {i}"))
    return out


@pytest.fixture(scope="module")
def licensed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cnbase")
    return Path(write_random_sd1(folder / "base.safetensors", seed=0,
                                 metadata={"modelspec.license": "CC-BY-NC-SA-4.0"}))


@pytest.fixture(scope="module")
def base(licensed: Path):
    return load_checkpoint(licensed)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory: pytest.TempPathFactory):
    return train_controlnet(base, _samples(), CONFIG, state_dir=tmp_path_factory.mktemp("state"))


def test_fresh_controlnet_copies_the_encoder_and_leaves_the_unet_output_unchanged(base) -> None:
    unet = base.unet
    net = controlnet_from_unet(unet, seed=1)
    own = net.state_dict()
    for name, value in unet.state_dict().items():
        if name.split(".")[0] in ("time_embed", "input_blocks", "middle_block"):
            assert torch.equal(own[name], value), name
    assert all(not z[0].weight.any() and not z[0].bias.any() for z in net.zero_convs)
    assert not net.middle_block_out[0].weight.any() and not net.input_hint_block[-1].weight.any()
    assert net.input_hint_block[0].weight.abs().sum() > 0  # the rest of the hint block is random
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, unet.config.context_dim, generator=g)
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        assert all(not r.any() for r in residuals)
        assert torch.equal(unet(x, t, context, control=residuals), unet(x, t, context))
    # The hint block's random part is drawn from the seed, whatever torch's global generator holds.
    torch.manual_seed(123)
    assert torch.equal(controlnet_from_unet(unet, seed=1).input_hint_block[0].weight, net.input_hint_block[0].weight)


def test_training_moves_the_controlnet_and_freezes_the_rest(base, trained) -> None:
    fresh = controlnet_from_unet(base.unet, seed=CONFIG.seed).state_dict()
    now = trained.model.state_dict()
    assert len(trained.losses) == CONFIG.steps and all(torch.isfinite(torch.tensor(trained.losses)))
    assert trained.model.zero_convs[0][0].weight.abs().sum() > 0  # the residual paths left zero
    assert not torch.equal(now["input_blocks.1.0.in_layers.2.weight"], fresh["input_blocks.1.0.in_layers.2.weight"])
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_killed_run_resumes_to_the_same_weights(base, trained, tmp_path: Path) -> None:
    seen: list[int] = []
    with pytest.raises(Killed):
        train_controlnet(base, _samples(), CONFIG, state_dir=tmp_path, on_step=kill_at(3, seen))
    resumed = train_controlnet(base, _samples(), CONFIG, state_dir=tmp_path)  # from the state saved at step 2
    assert seen == [1, 2, 3] and resumed.resumed_from == 2
    assert resumed.losses == trained.losses
    for name, value in trained.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="different ControlNet training"):
        train_controlnet(base, _samples(3), CONFIG, state_dir=tmp_path)


def test_saved_file_loads_as_a_controlnet_for_its_model(base, trained, tmp_path: Path) -> None:
    path = tmp_path / "thing-scribble.safetensors"
    save_controlnet(path, trained.model, controlnet_metadata(base, trained, {"modelspec.title": "thing"}))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith("control_model.") for k in f.keys())
        assert f.get_tensor("control_model.zero_convs.0.0.weight").dtype == torch.float16
    assert meta["modelspec.license"] == "CC-BY-NC-SA-4.0"
    assert meta["adforge.base_sha256"] == base.checkpoint.sha256 and '"steps": 6' in meta["adforge.training"]
    loaded = load_controlnet(path, base.unet.config, base.family.label)
    assert loaded.layout == "ldm"
    for name, value in trained.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value.half().float()), name

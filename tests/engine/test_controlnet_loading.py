"""Reading ControlNet files: the three layouts, refusals that name the file, the sha256 record, the pipeline's cache
and the request's validation of its controls."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.adapters.refs import AdapterFile
from engine.checkpoint import CheckpointError, file_sha256
from engine.controlnet_loading import inspect_controlnet, load_controlnet
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import TINY_UNET, random_spec
from engine.random_controlnet import controlnet_state_dict, random_controlnet, write_random_controlnet
from engine.requests import ControlUse


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    out = {layout: Path(write_random_controlnet(root / f"cn-{layout}.safetensors", "sd1", layout=layout, seed=4))
           for layout in ("ldm", "bare", "diffusers")}
    out["sdxl"] = Path(write_random_controlnet(root / "cn-sdxl.safetensors", "sdxl", seed=5))
    out["sd2"] = Path(write_random_controlnet(root / "cn-sd2.safetensors", "sd2", seed=6))
    return out


def _residuals(model, cfg=TINY_UNET):
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 4, 4, 6, generator=gen), torch.rand(1, 3, 32, 48, generator=gen)
    with torch.no_grad():
        return model(x, hint, torch.tensor([420.0]), torch.randn(1, 5, cfg.context_dim, generator=gen))


def test_three_layouts_load_the_same_network(files: dict[str, Path]) -> None:
    loaded = {layout: load_controlnet(files[layout], TINY_UNET, "SD 1.x") for layout in ("ldm", "bare", "diffusers")}
    want = random_controlnet("sd1", seed=4).state_dict()
    for layout, cn in loaded.items():
        assert cn.layout == layout and cn.family == "SD 1.x"
        got = cn.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), layout
    ref = _residuals(loaded["ldm"].model)
    for layout in ("bare", "diffusers"):
        # Equal weights; the kernels may round differently with how the file's tensors happen to be aligned in memory.
        for a, b in zip(ref, _residuals(loaded[layout].model)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_architecture_is_read_from_the_shapes(files: dict[str, Path]) -> None:
    info = inspect_controlnet(files["diffusers"])
    assert info.layout == "diffusers" and info.hint_widths == (16, 32, 96, 256) and info.hint_factor == 8
    assert replace(info.config, num_heads=TINY_UNET.num_heads) == replace(TINY_UNET, out_channels=4)
    xl = inspect_controlnet(files["sdxl"])
    assert xl.family == "SDXL" and xl.config.adm_in_channels == random_spec("sdxl").unet.adm_in_channels
    assert inspect_controlnet(files["sd2"]).family == "SD 2.x"


@pytest.mark.parametrize(("which", "message"), [("sdxl", "an SDXL ControlNet cannot steer an SD 1.x model"),
                                                ("sd2", "an SD 2.x ControlNet cannot steer an SD 1.x model")])
def test_a_controlnet_of_another_family_is_refused(files: dict[str, Path], which: str, message: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_controlnet(files[which], TINY_UNET, "SD 1.x")
    assert str(err.value) == f"{files[which]}: {message}"


def test_other_widths_and_other_vae_factors_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    wider = replace(TINY_UNET, model_channels=64)
    with pytest.raises(CheckpointError, match="residual widths"):
        load_controlnet(files["ldm"], wider, "SD 1.x")
    with pytest.raises(CheckpointError, match="downsamples 8x but the model's VAE 4x"):
        load_controlnet(files["ldm"], TINY_UNET, "SD 1.x", vae_factor=4)


def test_files_that_are_no_controlnet_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="a Stable Diffusion checkpoint: no ControlNet tensors") as err:
        load_controlnet(tiny_checkpoint, TINY_UNET, "SD 1.x")
    assert str(err.value).startswith(str(tiny_checkpoint))
    other = tmp_path / "weights.safetensors"
    save_file({"linear.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: not a ControlNet"):
        load_controlnet(other, TINY_UNET, "SD 1.x")
    broken = tmp_path / "broken.safetensors"
    sd = controlnet_state_dict(random_controlnet("sd1"), "bare")
    del sd["input_hint_block.6.weight"], sd["input_hint_block.6.bias"]
    save_file(sd, str(broken))
    with pytest.raises(CheckpointError, match="input_hint_block has convs"):
        load_controlnet(broken, TINY_UNET, "SD 1.x")


def test_pickles_need_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "cn.pth"
    torch.save(controlnet_state_dict(random_controlnet("sd1", seed=2), "ldm"), path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_controlnet(path, TINY_UNET, "SD 1.x")
    assert load_controlnet(path, TINY_UNET, "SD 1.x", allow_pickle=True).layout == "ldm"


def test_the_pipeline_loads_each_file_once_and_checks_its_sha(pipe: Pipeline, files: dict[str, Path]) -> None:
    sha = file_sha256(files["ldm"])
    first = pipe.controlnets.load(AdapterFile("cn", str(files["ldm"])))
    assert first.file.sha256 == sha and first.file.name == "cn-ldm"
    assert pipe.controlnets.load(AdapterFile("cn", str(files["ldm"]), sha)) is first
    with pytest.raises(CheckpointError, match="changed since it was recorded"):
        pipe.controlnets.load(AdapterFile("cn", str(files["ldm"]), "0" * 64))
    with pytest.raises(CheckpointError, match="an SDXL ControlNet cannot steer an SD 1.x model"):
        pipe.controlnets.load(AdapterFile("xl", str(files["sdxl"])))


def _use(path: Path, **kw) -> ControlUse:
    return ControlUse(AdapterFile(path.stem, str(path)), Image.new("RGB", (32, 32)), "canny", **kw)


@pytest.mark.parametrize(("kw", "message"), [({"strength": -0.1}, "strength must be >= 0"),
                                              ({"start": 0.5, "end": 0.5}, "0 <= start < end <= 1"),
                                              ({"end": 1.2}, "0 <= start < end <= 1")])
def test_bad_controls_are_refused(files: dict[str, Path], kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationRequest("a", seed=1, width=32, height=32, controls=(_use(files["ldm"], **kw),)).validate()


def test_tiled_denoising_with_controls_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="tiled denoising"):
        GenerationRequest("a", seed=1, width=64, height=64, tile=64, controls=(_use(files["ldm"]),)).validate()


def test_controls_are_part_of_the_batch_key(files: dict[str, Path]) -> None:
    base = GenerationRequest("a", seed=1, width=32, height=32, controls=(_use(files["ldm"]),))
    sampler = base.validate()
    white = replace(base, controls=(replace(_use(files["ldm"]), image=Image.new("RGB", (32, 32), "white")),))
    stronger = replace(base, controls=(_use(files["ldm"], strength=0.5),))
    later = replace(base, controls=(_use(files["ldm"], start=0.1),))
    keys = {r.batch_key(sampler) for r in (base, white, stronger, later, replace(base, controls=()))}
    assert len(keys) == 5
    assert replace(base, seed=2).batch_key(sampler) == base.batch_key(sampler)


def test_an_inpainting_model_gives_the_controlnet_only_the_latent(tiny_inpaint_checkpoint: Path,
                                                                  files: dict[str, Path]) -> None:
    # A 9-channel inpainting U-Net's ControlNet reads 4 channels: the mask and masked-image channels are not its input.
    inpaint = Pipeline.load(tiny_inpaint_checkpoint, device="cpu", dtype="float32")
    init = Image.new("RGB", (32, 32), (90, 140, 200))
    base = GenerationRequest("a", seed=3, width=32, height=32, steps=2, sampler="Euler", init_image=init,
                             mask=Image.new("L", (32, 32), 255), strength=1.0)
    plain, steered = inpaint.generate([base, replace(base, controls=(_use(files["ldm"]),))])
    assert not np.array_equal(np.asarray(plain.image), np.asarray(steered.image))

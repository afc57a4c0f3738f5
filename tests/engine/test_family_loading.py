"""Random SD 2.x / SDXL checkpoints in the real single-file layouts: what detection calls them, that they load and
render, how the prediction type is decided, what a damaged file's error names, and that the writers are the
loader's exact inverse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from engine.checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointError, open_state_dict
from engine.checkpoint_writer import checkpoint_metadata, sd2_state_dict, sdxl_state_dict
from engine.families import detect_family
from engine.loading import SDXL_CLIP_L_PREFIX, load_checkpoint
from engine.open_clip import SD2_PREFIX, SDXL_CLIP_G_PREFIX
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import random_spec, random_state_dict, write_random
from engine.text_encoder import TextEncoderConfig, build_text_encoder
from engine.unet import UNetModel

SIZE = 64
# (write_random family, inpaint) -> the family row detection must find and the prediction the model must get
FILES = {
    ("sd2", False): ("sd2", "eps"),
    ("sd2-v", False): ("sd2", "v"),
    ("sd2", True): ("sd2-inpaint", "eps"),
    ("sdxl", False): ("sdxl", "eps"),
    ("sdxl", True): ("sdxl-inpaint", "eps"),
}


def _name(family: str, inpaint: bool) -> str:
    return f"{family}{'-inpaint' if inpaint else ''}"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    folder = tmp_path_factory.mktemp("families")
    return {(fam, inp): Path(write_random(folder / f"{_name(fam, inp)}.safetensors", fam, seed=2, inpaint=inp))
            for fam, inp in FILES}


def _req(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red cube", "negative_prompt": "blurry", "seed": 3, "width": SIZE,
                                "height": SIZE, "steps": 3, "cfg_scale": 5.0, "sampler": "Euler", **kw})


@pytest.mark.parametrize("key", list(FILES), ids=lambda k: _name(*k))
def test_each_family_is_detected_loads_and_renders(files, key) -> None:
    family, prediction = FILES[key]
    path = files[key]
    assert path.stat().st_size < 32 * 2**20  # tiny: a few MB
    detection = detect_family(open_state_dict(path))
    assert detection.name == family and detection.supported
    pipe = Pipeline.load(path, device="cpu", dtype="float32")
    assert pipe.models.family.name == family and pipe.models.prediction == prediction
    assert (pipe.models.text_encoder_2 is not None) == family.startswith("sdxl")
    image = pipe.generate([_req()])[0].image
    pixels = np.asarray(image, dtype=np.int16)
    assert image.size == (SIZE, SIZE) and pixels.std() > 5  # noise by design, but not a flat image
    again = pipe.generate([_req()])[0].image
    assert np.array_equal(np.asarray(again), np.asarray(image))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_inpainting_uses_the_mask_and_keeps_the_rest(files, family: str) -> None:
    pipe = Pipeline.load(files[(family, True)], device="cpu", dtype="float32")
    assert pipe.models.is_inpainting and pipe.models.unet.config.in_channels == 9
    init = Image.fromarray(np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None], (SIZE, 1, 3)), "RGB")
    left = np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2] = 255
    a = pipe.generate([_req(init_image=init, mask=Image.fromarray(left, "L"), mask_blur=0, strength=1.0)])[0].image
    b = pipe.generate([_req(init_image=init, mask=Image.fromarray(255 - left, "L"), mask_blur=0, strength=1.0)])[0].image
    a, b, kept = (np.asarray(x, dtype=np.int16) for x in (a, b, init))
    assert np.array_equal(a[:, SIZE // 2:], kept[:, SIZE // 2:]) and np.array_equal(b[:, : SIZE // 2], kept[:, : SIZE // 2])
    assert np.abs(a[:, : SIZE // 2] - kept[:, : SIZE // 2]).mean() > 5  # the masked half was repainted


def test_full_presets_are_the_published_architectures() -> None:
    """Shapes only (the meta device): writing a full preset takes gigabytes, so tests never do."""
    counts = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}  # as diffusers' models of the releases
    for family, params in counts.items():
        spec = random_spec(family, "full")
        with torch.device("meta"):
            assert sum(p.numel() for p in UNetModel(spec.unet).parameters()) == params
    sd2, sdxl = random_spec("sd2", "full"), random_spec("sdxl", "full")
    with torch.device("meta"):  # CLIP-L and bigG (with its projection) as diffusers' SDXL text encoders count them
        assert [sum(p.numel() for p in build_text_encoder(c).parameters()) for c in (sdxl.text, sdxl.text_2)] == [
            123_060_480, 694_659_840]
    assert (sd2.text.hidden_size, sd2.text.num_layers, sd2.text.hidden_act, sd2.projection_dim) == (1024, 24, "gelu", 1024)
    assert sdxl.text_2 is not None and (sdxl.text_2.hidden_size, sdxl.text_2.num_layers, sdxl.text_2.projection_dim) == (1280, 32, 1280)
    assert sdxl.unet.context_dim == sdxl.text.hidden_size + sdxl.text_2.hidden_size == 2048
    assert sdxl.unet.adm_in_channels == 1280 + 6 * 256 and sdxl.vae.scaling_factor == 0.13025
    assert (random_spec("sd2-v", "full").prediction, random_spec("sd2-v", "full").native_size) == ("v", 768)
    assert random_spec("sd1", "sd15") == random_spec("sd1", "full")
    with pytest.raises(ValueError, match="unknown family"):
        random_spec("sd3")
    with pytest.raises(ValueError, match="unknown preset"):
        random_spec("sdxl", "sd15")


# ---- the prediction type ----------------------------------------------------------------------------------------


def _sd2_without_declaration(tmp_path: Path, name: str, global_step: int | None = None, **meta: str) -> Path:
    tensors, metadata = random_state_dict("sd2", seed=4)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("modelspec.")} | meta
    if global_step is not None:
        tensors["global_step"] = torch.tensor(global_step)  # as the top-level counter of a converted .ckpt
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_prediction_from_metadata_global_step_and_override(tmp_path: Path, files) -> None:
    assert open_state_dict(files[("sd2-v", False)]).metadata["modelspec.prediction_type"] == "v"
    assert open_state_dict(files[("sd2", False)]).metadata["modelspec.prediction_type"] == "epsilon"
    # No declaration: SD 2.0-base's global_step means eps, anything else (or nothing) v -- diffusers' rule.
    assert load_checkpoint(_sd2_without_declaration(tmp_path, "base", 875000)).prediction == "eps"
    assert load_checkpoint(_sd2_without_declaration(tmp_path, "other", 110000)).prediction == "v"
    undeclared = _sd2_without_declaration(tmp_path, "bare")
    assert load_checkpoint(undeclared).prediction == "v"
    # our own key, and the ModelSpec key winning over the step
    assert load_checkpoint(_sd2_without_declaration(tmp_path, "ours", 875000, **{"adforge.prediction": "v"})).prediction == "v"
    assert load_checkpoint(_sd2_without_declaration(
        tmp_path, "spec", **{"modelspec.prediction_type": "epsilon"})).prediction == "eps"
    # the caller's override beats everything the file says
    assert load_checkpoint(files[("sd2-v", False)], prediction="eps").prediction == "eps"
    assert load_checkpoint(undeclared, prediction="epsilon").prediction == "eps"
    assert load_checkpoint(files[("sd2", False)], prediction="v_prediction").prediction == "v"
    with pytest.raises(CheckpointError, match="override says prediction 'x0'"):
        load_checkpoint(undeclared, prediction="x0")
    with pytest.raises(CheckpointError, match="metadata says prediction 'sample'"):
        load_checkpoint(_sd2_without_declaration(tmp_path, "odd", **{"modelspec.prediction_type": "sample"}))


def test_the_prediction_changes_the_image(files) -> None:
    eps = Pipeline(load_checkpoint(files[("sd2-v", False)], prediction="eps"))
    v = Pipeline(load_checkpoint(files[("sd2-v", False)]))
    a, b = (np.asarray(p.generate([_req()])[0].image, dtype=np.int16) for p in (eps, v))
    assert np.abs(a - b).mean() > 5


# ---- damaged files name the file's key ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [
    SDXL_CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight",
    SDXL_CLIP_G_PREFIX + "transformer.resblocks.2.mlp.c_proj.bias",
    SDXL_CLIP_G_PREFIX + "text_projection",
    SDXL_CLIP_G_PREFIX + "ln_final.weight",
    SDXL_CLIP_L_PREFIX + "text_model.encoder.layers.1.self_attn.k_proj.weight",
    UNET_PREFIX + "label_emb.0.2.weight",
])
def test_a_missing_sdxl_tensor_names_the_files_key(tmp_path: Path, files, key: str) -> None:
    sd = load_file(str(files[("sdxl", False)]))
    assert key in sd
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k != key}, str(path), metadata=dict(open_state_dict(files[("sdxl", False)]).metadata))
    with pytest.raises(CheckpointError, match="missing tensor") as info:
        load_checkpoint(path)
    assert info.value.key == key and f"'{key}'" in str(info.value)


def test_a_missing_sd2_tensor_names_the_files_key(tmp_path: Path, files) -> None:
    key = SD2_PREFIX + "transformer.resblocks.1.attn.in_proj_bias"
    sd = load_file(str(files[("sd2", False)]))
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k != key}, str(path), metadata=dict(open_state_dict(files[("sd2", False)]).metadata))
    with pytest.raises(CheckpointError, match="missing tensor") as info:
        load_checkpoint(path)
    assert info.value.key == key


# ---- the writers are the loader's inverse --------------------------------------------------------------------------


def _assert_same(written: dict[str, torch.Tensor], file: dict[str, torch.Tensor]) -> None:
    assert sorted(written) == sorted(file)
    for k, v in file.items():
        assert written[k].dtype == v.dtype and torch.equal(written[k], v), k


def test_writing_loaded_models_gives_back_the_file(files) -> None:
    for key in (("sd2", False), ("sd2", True)):
        file = load_file(str(files[key]))
        m = load_checkpoint(files[key])
        written = sd2_state_dict(m.unet, m.text_encoder, m.vae, text_projection=file[SD2_PREFIX + "text_projection"])  # type: ignore[arg-type]
        _assert_same(written, file)
    file = load_file(str(files[("sdxl", False)]))
    m = load_checkpoint(files[("sdxl", False)])
    _assert_same(sdxl_state_dict(m.unet, m.text_encoder, m.text_encoder_2, m.vae), file)  # type: ignore[arg-type]


def test_real_layout_details(files) -> None:
    sd = open_state_dict(files[("sd2", False)])
    width = sd.shape(SD2_PREFIX + "token_embedding.weight")[1]
    assert sd.shape(SD2_PREFIX + "logit_scale") == () and sd.shape(SD2_PREFIX + "text_projection") == (width, 24)
    assert sd.shape(SD2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight") == (3 * width, width)
    assert not any(k.startswith(("cond_stage_model.transformer.", "conditioner.")) for k in sd)
    xl = open_state_dict(files[("sdxl", False)])
    assert xl.shape(SDXL_CLIP_G_PREFIX + "logit_scale") == () and xl.shape(SDXL_CLIP_G_PREFIX + "text_projection") == (32, 24)
    assert any(k.startswith(SDXL_CLIP_L_PREFIX + "text_model.encoder.layers.") for k in xl)
    assert any(k.startswith(VAE_PREFIX + "decoder.") for k in xl) and UNET_PREFIX + "label_emb.0.0.weight" in xl
    assert xl.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    # 64-wide heads (the real widths) need no metadata; encoders that would need different counts cannot share it
    real = [build_text_encoder(TextEncoderConfig(hidden_size=128, num_layers=1, num_heads=2, vocab_size=8)),
            build_text_encoder(TextEncoderConfig(hidden_size=192, num_layers=1, num_heads=3, vocab_size=8))]
    with torch.device("meta"):
        unet = UNetModel(random_spec("sdxl", "full").unet)
    assert checkpoint_metadata(unet, real) == {"adforge.unet.head_channels": "64"}
    odd = build_text_encoder(TextEncoderConfig(hidden_size=192, num_layers=1, num_heads=4, vocab_size=8))
    with pytest.raises(ValueError, match="cannot share"):
        checkpoint_metadata(unet, [real[0], odd])


def test_write_random_refuses_what_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no inpainting variant"):
        write_random(tmp_path / "x.safetensors", "sd2-v", inpaint=True)
    assert not (tmp_path / "x.safetensors").exists()


# ---- the command ----------------------------------------------------------------------------------------------------


def test_models_init_random_writes_each_family(tmp_path: Path) -> None:
    from cli.app import app

    runner = CliRunner()
    for family, want in (("sd2", "sd2"), ("sd2-v", "sd2"), ("sdxl", "sdxl")):
        path = tmp_path / f"{family}.safetensors"
        res = runner.invoke(app, ["models", "init-random", str(path), "--family", family, "--seed", "1"])
        assert res.exit_code == 0, res.output
        sd = open_state_dict(path)
        assert detect_family(sd).name == want and sd.metadata["adforge.native_size"] == "128"
        assert sd.metadata["modelspec.license"] == "Apache-2.0"
    assert open_state_dict(tmp_path / "sd2-v.safetensors").metadata["modelspec.prediction_type"] == "v"
    half = tmp_path / "half.safetensors"
    assert runner.invoke(app, ["models", "init-random", str(half), "--family", "sd2", "--inpaint", "--dtype", "float16"]).exit_code == 0
    assert detect_family(open_state_dict(half)).name == "sd2-inpaint"
    assert open_state_dict(half)[UNET_PREFIX + "out.2.weight"].dtype == torch.float16
    for args, hint in ((["--family", "sd3"], "unknown family"), (["--family", "sdxl", "--preset", "huge"], "unknown preset"),
                       (["--family", "sd2-v", "--inpaint"], "no inpainting variant"), (["--dtype", "int8"], "unknown dtype")):
        bad = runner.invoke(app, ["models", "init-random", str(tmp_path / "bad.safetensors"), *args])
        assert bad.exit_code == 2 and hint in bad.output, (args, bad.output)

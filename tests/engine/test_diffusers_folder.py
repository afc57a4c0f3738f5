"""diffusers folders load with the same engine: the folder's tensors mapped to the single-file layout are exactly the
file's, and rendering from the folder equals rendering from the file, bit for bit.

The folders are written by diffusers itself (test-only): the tiny random files of ``write_random`` go through
diffusers' own single-file converters into diffusers' pipelines (as in test_family_pipelines), whose
``save_pretrained`` writes ``model_index.json`` and the components. diffusers' SD 2.x text encoder lacks the tower's
last block and keeps no ``text_projection`` / ``logit_scale``: those (unused by SD 2.x) are the only tensors of the
file the folder cannot give back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from engine.checkpoint import UNET_PREFIX, CheckpointError, open_state_dict  # noqa: E402
from engine.diffusers_folder import (  # noqa: E402
    _unet_metadata,
    _unet_prefixes,
    _vae_rename,
    folder_sha256,
    open_folder,
    open_model,
)
from engine.open_clip import SD2_PREFIX, SDXL_CLIP_G_PREFIX  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.random_checkpoint import write_random  # noqa: E402
from engine.unet import UNetConfig, UNetModel  # noqa: E402
from engine.vae import AutoencoderKL, VAEConfig  # noqa: E402
from tests.engine.test_family_pipelines import _clip_l, _open_clip, _scheduler, _unet, _vae  # noqa: E402
from tests.engine.test_open_clip import hf_tokenizer  # noqa: E402
from tests.engine.test_unet_parity import diffusers_config  # noqa: E402

FAMILIES = ["sd1", "sd2-v", "sdxl"]
# File metadata a folder has no counterpart for (SAI ModelSpec bookkeeping).
FILE_ONLY_META = {"modelspec.sai_model_spec", "modelspec.architecture"}


def _write_folder(family: str, file: Path, folder: Path, **save) -> None:
    """``save``: more ``save_pretrained`` arguments (``max_shard_size``, ``variant``)."""
    _diffusers_pipeline(family, file).save_pretrained(folder, safe_serialization=True, **save)


def _diffusers_pipeline(family: str, file: Path):
    """The file's tensors in diffusers' own pipeline of its family."""
    ours = Pipeline.load(file, device="cpu", dtype="float32")
    m = ours.models
    sd = load_file(str(file))
    unet = _unet(sd, ours)
    unet.register_to_config(sample_size=m.native_size // 8)
    common = dict(vae=_vae(sd, m.vae.config), unet=unet, scheduler=_scheduler(m.prediction))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            text_encoder=_clip_l(sd, m.text_encoder), tokenizer=hf_tokenizer("<|endoftext|>"),
            text_encoder_2=_open_clip(sd, SDXL_CLIP_G_PREFIX, m.text_encoder_2, drop_last=False),
            tokenizer_2=hf_tokenizer("!"), add_watermarker=False, **common)
    else:
        text = (_clip_l(sd, m.text_encoder) if family == "sd1"
                else _open_clip(sd, SD2_PREFIX, m.text_encoder, drop_last=True))
        pipe = StableDiffusionPipeline(text_encoder=text, tokenizer=hf_tokenizer("!" if family != "sd1" else "<|endoftext|>"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    file = Path(write_random(root / f"{request.param}.safetensors", request.param, seed=11))
    folder = root / "folder"
    _write_folder(request.param, file, folder)
    return request.param, file, folder


def _not_in_folder(family: str, key: str) -> bool:
    """File tensors diffusers' layout has no counterpart for (none of them used by the engine)."""
    return key.endswith("model.logit_scale") or (family == "sd2-v" and key == SD2_PREFIX + "text_projection")


def test_folder_gives_back_the_files_tensors(pair) -> None:
    family, file, folder = pair
    want, got = open_state_dict(file), open_folder(folder)
    last = ""
    if family == "sd2-v":  # diffusers dropped the tower's last block: the folder has a zero block in its place
        n = max(int(k[len(SD2_PREFIX):].split(".")[2]) for k in want if k.startswith(SD2_PREFIX + "transformer.resblocks."))
        last = f"{SD2_PREFIX}transformer.resblocks.{n}."
        assert {k for k in got if k.startswith(last)} == {k for k in want if k.startswith(last)}
        assert all(not got[k].any() for k in got if k.startswith(last))
    assert sorted(got) == sorted(k for k in want if not _not_in_folder(family, k))
    for key in got:
        assert got.shape(key) == tuple(got[key].shape) == want.shape(key), key
        if not (last and key.startswith(last)):
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    file_meta = {k: v for k, v in want.metadata.items() if k not in FILE_ONLY_META}
    # SD 1.x files declare no prediction; the folder's scheduler always does
    assert {k: v for k, v in got.metadata.items() if k != "modelspec.prediction_type"} == {
        k: v for k, v in file_meta.items() if k != "modelspec.prediction_type"}
    expected_prediction = {"sd1": "epsilon", "sd2-v": "v", "sdxl": "epsilon"}[family]
    assert got.metadata["modelspec.prediction_type"] == expected_prediction


def _render(pipe: Pipeline) -> tuple[np.ndarray, torch.Tensor]:
    reqs = [GenerationRequest(prompt=p, negative_prompt="blurry", seed=s, width=64, height=64, steps=3, cfg_scale=5.0,
                              sampler="Euler") for p, s in (("a red cube", 7), ("a blue sphere, (studio:1.2)", 99))]
    results = pipe.generate(reqs)
    return np.stack([np.asarray(r.image) for r in results]), torch.stack([r.latents for r in results])  # type: ignore[misc]


def test_rendering_from_the_folder_equals_rendering_from_the_file(pair) -> None:
    family, file, folder = pair
    from_file = Pipeline.load(file, device="cpu", dtype="float32")
    from_folder = Pipeline.load(folder, device="cpu", dtype="float32")
    assert from_folder.models.family == from_file.models.family
    assert from_folder.models.prediction == from_file.models.prediction
    assert from_folder.models.native_size == from_file.models.native_size
    assert from_folder.models.checkpoint.sha256 == folder_sha256(folder)
    pixels_file, latents_file = _render(from_file)
    pixels_folder, latents_folder = _render(from_folder)
    assert torch.equal(latents_file, latents_folder)
    assert np.array_equal(pixels_file, pixels_folder)
    assert pixels_file.std() > 5  # not a blank image matching another blank image


def test_base_weights_of_a_folder_model_can_be_had_again(pair) -> None:
    """Undoing a merged LoRA needs the base weights: a folder model keeps them in memory (no single file to re-read)."""
    _, _, folder = pair
    models = Pipeline.load(folder, device="cpu", dtype="float32").models
    name, param = next(iter(models.unet.state_dict().items()))
    models.base_weights.check()
    models.base_weights.remember("unet", name, param)
    (got_name, value), = list(models.base_weights.read("unet", [name]))
    assert got_name == name and torch.equal(value.reshape(param.shape).to(param.dtype), param)


# ---- identity --------------------------------------------------------------------------------------------------


def test_folder_hash_is_stable_and_covers_configs(pair, tmp_path: Path) -> None:
    _, _, folder = pair
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert folder_sha256(copy) == folder_sha256(folder)
    sched = copy / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["prediction_type"] = "v_prediction" if cfg["prediction_type"] == "epsilon" else "epsilon"
    sched.write_text(json.dumps(cfg))
    assert folder_sha256(copy) != folder_sha256(folder)


# ---- errors: one line, naming the file and key -------------------------------------------------------------------


@pytest.fixture
def sd1_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    root = tmp_path_factory.getbasetemp() / "sd1-errors"
    folder = root / "folder"
    if not folder.exists():
        file = Path(write_random(root / "sd1.safetensors", "sd1", seed=2))
        _write_folder("sd1", file, folder)
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def _error(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_model(path)
    assert "\n" not in str(info.value)
    return info.value


def test_folder_without_model_index(sd1_copy: Path) -> None:
    (sd1_copy / "model_index.json").unlink()
    err = _error(sd1_copy)
    assert err.path == str(sd1_copy) and "model_index.json" in str(err)


def test_missing_component(sd1_copy: Path) -> None:
    shutil.rmtree(sd1_copy / "vae")
    err = _error(sd1_copy)
    assert err.path == str(sd1_copy / "vae") and "missing component" in str(err)
    index = json.loads((sd1_copy / "model_index.json").read_text())
    del index["vae"]
    (sd1_copy / "model_index.json").write_text(json.dumps(index))
    err = _error(sd1_copy)
    assert err.path == str(sd1_copy / "model_index.json") and err.key == "vae"


def test_missing_weights_file(sd1_copy: Path) -> None:
    weights = sd1_copy / "text_encoder" / "model.safetensors"
    weights.unlink()
    err = _error(sd1_copy)
    assert err.path == str(weights)


def test_unknown_tensor_name(sd1_copy: Path) -> None:
    weights = sd1_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["down_blocks.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(weights))
    err = _error(sd1_copy)
    assert err.path == str(weights) and err.key == "down_blocks.0.mystery.weight"


def test_not_clips_vocabulary(sd1_copy: Path) -> None:
    tokenizer = sd1_copy / "tokenizer"
    vocab_file = tokenizer / "vocab.json"
    if vocab_file.exists():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        vocab["<|extra|>"] = len(vocab)
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    else:  # transformers 5 saves tokenizer.json only
        vocab_file = tokenizer / "tokenizer.json"
        whole = json.loads(vocab_file.read_text(encoding="utf-8"))
        whole["added_tokens"].append({**whole["added_tokens"][-1], "id": 49408, "content": "<|extra|>"})
        vocab_file.write_text(json.dumps(whole), encoding="utf-8")
    err = _error(sd1_copy)
    assert err.path == str(vocab_file) and "49409 tokens" in str(err)


def test_unsupported_prediction_type(sd1_copy: Path) -> None:
    sched = sd1_copy / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["prediction_type"] = "sample"
    sched.write_text(json.dumps(cfg))
    err = _error(sd1_copy)
    assert err.path == str(sched) and err.key == "prediction_type"


# ---- the name mapping at other shapes than the tiny files' ---------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    # SD 1.x's structure: two resnets per level, the deepest level without attention (an UpBlock2D upsampler first)
    UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1), num_heads=4,
               context_dim=16),
    # SDXL's: no attention at the first level, deeper transformers below, label_emb
    UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, num_head_channels=16, context_dim=16,
               use_linear_in_transformer=True, transformer_depth_per_level=(0, 1, 2), transformer_depth_middle=2,
               adm_in_channels=64),
], ids=["sd1-like", "sdxl-like"])
def test_unet_names_map_back_to_ldm(cfg: UNetConfig) -> None:
    with torch.device("meta"):
        ldm = {UNET_PREFIX + k: torch.zeros(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
    dcfg = diffusers_config(cfg, size_dim=256)  # the engine's SDXL size embedding width
    converted = convert_ldm_unet_checkpoint({k: torch.zeros(v.shape) for k, v in ldm.items()}, dcfg)
    rename = _unet_prefixes(dcfg, Path("unet/config.json"))
    mapped = {UNET_PREFIX + str(rename(k)): tuple(v.shape) for k, v in converted.items()}
    assert mapped == {k: tuple(v.shape) for k, v in ldm.items()}
    assert _unet_metadata(dcfg, Path("unet/config.json")) in (
        {"adforge.unet.num_heads": "4"}, {"adforge.unet.head_channels": "16"})


def test_vae_names_map_back_to_ldm() -> None:
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
    ldm = {k: torch.zeros(v.shape) for k, v in AutoencoderKL(cfg).state_dict().items()}
    dcfg = {"block_out_channels": [32 * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
    converted = convert_ldm_vae_checkpoint(ldm, dcfg)
    rename = _vae_rename(len(cfg.ch_mult))
    assert sorted(str(rename(k)) for k in converted) == sorted(ldm)

"""The SDXL refiner as diffusers saves it (``StableDiffusionXLImg2ImgPipeline`` with no ``text_encoder``, bigG as
``text_encoder_2``, ``requires_aesthetics_score``) opens as the refiner file's layout: the same tensors as the refiner
single file, detected as ``sdxl-refiner``, and a base + refiner render with the folder equals the one with the file.

The folder is written by diffusers itself (test-only) from the tiny refiner file of test_sdxl_refiner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import StableDiffusionXLImg2ImgPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from engine.checkpoint import CheckpointError, open_state_dict  # noqa: E402
from engine.diffusers_folder import open_model  # noqa: E402
from engine.families import detect_family  # noqa: E402
from engine.open_clip import SDXL_REFINER_CLIP_G_PREFIX  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.random_checkpoint import write_random  # noqa: E402
from tests.engine.test_family_pipelines import _open_clip, _scheduler, _unet, _vae  # noqa: E402
from tests.engine.test_open_clip import hf_tokenizer  # noqa: E402
from tests.engine.test_sdxl_refiner import _write_refiner  # noqa: E402

# File metadata a folder has no counterpart for (SAI ModelSpec bookkeeping).
FILE_ONLY_META = {"modelspec.sai_model_spec", "modelspec.architecture"}


def _write_refiner_folder(file: Path, folder: Path) -> None:
    """The refiner file's tensors in diffusers' own img2img pipeline, as test_sdxl_refiner builds it, saved."""
    refiner = Pipeline.load(file, device="cpu", dtype="float32")
    r = refiner.models
    sd = load_file(str(file))
    unet = _unet(sd, refiner)
    unet.register_to_config(sample_size=r.native_size // 8)  # the folder's native size comes from here
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(sd, r.vae.config), text_encoder=None, tokenizer=None,
        text_encoder_2=_open_clip(sd, SDXL_REFINER_CLIP_G_PREFIX, r.text_encoder, drop_last=False),
        tokenizer_2=hf_tokenizer("!"), unet=unet, scheduler=_scheduler("eps"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base SDXL file, refiner file, refiner folder)."""
    root = tmp_path_factory.mktemp("refiner-folder")
    base = Path(write_random(root / "sdxl.safetensors", "sdxl", seed=5))
    file = _write_refiner(root / "refiner.safetensors")
    folder = root / "folder"
    _write_refiner_folder(file, folder)
    return base, file, folder


def test_folder_is_saved_as_diffusers_saves_a_refiner(refiner) -> None:
    _, _, folder = refiner
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["requires_aesthetics_score"] is True
    assert not (folder / "text_encoder").exists()


def test_folder_gives_back_the_refiner_files_tensors(refiner) -> None:
    _, file, folder = refiner
    want, got = open_state_dict(file), open_model(folder)
    # open_clip's logit_scale has no counterpart in transformers' tower (and the engine does not use it)
    assert sorted(got) == sorted(k for k in want if not k.endswith("model.logit_scale"))
    assert any(k.startswith(SDXL_REFINER_CLIP_G_PREFIX) for k in got)
    for key in got:
        assert got.shape(key) == tuple(got[key].shape) == want.shape(key), key
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    file_meta = {k: v for k, v in want.metadata.items() if k not in FILE_ONLY_META}
    assert {k: got.metadata[k] for k in file_meta} == file_meta
    assert got.metadata["modelspec.prediction_type"] == "epsilon"
    assert detect_family(got).name == "sdxl-refiner"


def _render(base: Pipeline, switch: float | None = 0.6) -> tuple[np.ndarray, torch.Tensor]:
    reqs = [GenerationRequest(prompt=p, negative_prompt="blurry", seed=s, width=64, height=64, steps=4, cfg_scale=5.0,
                              sampler="Euler", refiner_switch=switch)
            for p, s in (("a red cube", 7), ("a blue sphere, (studio:1.2)", 99))]
    results = base.generate(reqs)
    return np.stack([np.asarray(r.image) for r in results]), torch.stack([r.latents for r in results])  # type: ignore[misc]


def test_base_plus_refiner_folder_renders_as_with_the_refiner_file(refiner) -> None:
    base_file, file, folder = refiner
    base = Pipeline.load(base_file, device="cpu", dtype="float32")
    from_folder = Pipeline.load(folder, device="cpu", dtype="float32")
    assert from_folder.models.family.name == "sdxl-refiner"
    base.refiner = Pipeline.load(file, device="cpu", dtype="float32")
    pixels_file, latents_file = _render(base)
    base.refiner = from_folder
    pixels_folder, latents_folder = _render(base)
    assert torch.equal(latents_file, latents_folder)
    assert np.array_equal(pixels_file, pixels_folder)
    assert pixels_file.std() > 5  # not a blank image matching another blank image
    plain, _ = _render(base, switch=None)
    assert not np.array_equal(plain, pixels_file)  # the refiner took part


# ---- errors: one line, naming the file and key -------------------------------------------------------------------


def _error(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_model(path)
    assert "\n" not in str(info.value)
    return info.value


def _edit_index(folder: Path, **changes: object) -> None:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(changes)
    index_file.write_text(json.dumps(index))


def test_null_text_encoder_without_text_encoder_2(refiner, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(refiner[2], copy)
    _edit_index(copy, text_encoder_2=[None, None])
    err = _error(copy)
    assert err.path == str(copy / "model_index.json") and err.key == "text_encoder" and "text_encoder_2" in str(err)


def test_null_text_encoder_without_aesthetic_score(refiner, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(refiner[2], copy)
    _edit_index(copy, requires_aesthetics_score=False)
    err = _error(copy)
    assert err.path == str(copy / "model_index.json") and err.key == "requires_aesthetics_score"

"""diffusers folders as they are downloaded: sharded weights, ``fp16`` variants, sharded variants and ``.bin`` pickles,
all written by diffusers' own ``save_pretrained`` (test-only), load to the plain folder's tensors and render its image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

from engine.checkpoint import CheckpointError  # noqa: E402
from engine.diffusers_folder import folder_sha256, model_sha256, open_folder, open_model  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.random_checkpoint import write_random  # noqa: E402
from tests.engine.test_diffusers_folder import _diffusers_pipeline, _render  # noqa: E402

SHARD = "40KB"  # the tiny models' components are a few hundred KB: several shards each
COMPONENTS = {"sd1": ["unet", "vae", "text_encoder"], "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"]}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def folders(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Path]]:
    """One family's folders: plain, sharded, fp16 variant only, sharded fp16 variant only, and both (plain float32
    plus a real float16 variant)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"variants-{family}")
    file = Path(write_random(root / f"{family}.safetensors", family, seed=5))
    pipe = _diffusers_pipeline(family, file)
    out = {name: root / name for name in ("plain", "sharded", "fp16", "sharded-fp16", "both")}
    pipe.save_pretrained(out["plain"], safe_serialization=True)
    pipe.save_pretrained(out["sharded"], safe_serialization=True, max_shard_size=SHARD)
    pipe.save_pretrained(out["fp16"], safe_serialization=True, variant="fp16")
    pipe.save_pretrained(out["sharded-fp16"], safe_serialization=True, variant="fp16", max_shard_size=SHARD)
    shutil.copytree(out["plain"], out["both"])
    pipe.to(torch.float16).save_pretrained(out["both"], safe_serialization=True, variant="fp16")
    return family, out


def _same_tensors(got, want, cast: torch.dtype | None = None) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        expected = want[key] if cast is None else want[key].to(cast)
        assert got.shape(key) == want.shape(key), key
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key
    assert got.metadata == want.metadata


def test_diffusers_wrote_what_we_read(folders) -> None:
    family, out = folders
    for name in COMPONENTS[family]:
        stem = "diffusion_pytorch_model" if name in ("unet", "vae") else "model"
        assert (out["sharded"] / name / f"{stem}.safetensors.index.json").is_file(), name
        assert len(list((out["sharded"] / name).glob(f"{stem}-*.safetensors"))) > 1, name
        assert (out["fp16"] / name / f"{stem}.fp16.safetensors").is_file(), name
        assert (out["sharded-fp16"] / name / f"{stem}.safetensors.index.fp16.json").is_file(), name
        assert not (out["fp16"] / name / f"{stem}.safetensors").exists()


@pytest.mark.parametrize("layout", ["sharded", "fp16", "sharded-fp16"])
def test_layouts_give_the_plain_folders_tensors(folders, layout: str) -> None:
    _, out = folders
    _same_tensors(open_folder(out[layout]), open_folder(out["plain"]))
    if "fp16" in layout:
        _same_tensors(open_folder(out[layout], variant="fp16"), open_folder(out["plain"]))


def test_full_precision_is_preferred_unless_the_variant_is_asked_for(folders) -> None:
    _, out = folders
    plain = open_folder(out["plain"])
    _same_tensors(open_folder(out["both"]), plain)
    _same_tensors(open_model(out["both"], variant="fp16"), plain, cast=torch.float16)
    # another variant read: another identity (the configs are the variant save's: the hash is no longer the plain's)
    assert folder_sha256(out["both"], variant="fp16") != folder_sha256(out["both"])


def test_sharded_folders_render_the_plain_folders_image(folders) -> None:
    _, out = folders
    want = _render(Pipeline.load(out["plain"], device="cpu", dtype="float32"))
    for layout in ("sharded", "sharded-fp16"):
        pipe = Pipeline.load(out[layout], device="cpu", dtype="float32")
        assert pipe.models.checkpoint.sha256 == model_sha256(out[layout])
        got = _render(pipe)
        assert torch.equal(got[1], want[1]) and np.array_equal(got[0], want[0]), layout


def test_hash_covers_every_shard_and_is_stable(folders, tmp_path: Path) -> None:
    _, out = folders
    copy = tmp_path / "copy"
    shutil.copytree(out["sharded"], copy)
    assert folder_sha256(copy) == folder_sha256(out["sharded"])
    assert folder_sha256(out["sharded"]) != folder_sha256(out["plain"])  # other files, other identity
    shard = sorted((copy / "unet").glob("diffusion_pytorch_model-*.safetensors"))[-1]
    tensors = load_file(str(shard))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(shard))
    assert folder_sha256(copy) != folder_sha256(out["sharded"])


# ---- errors: one line, naming the folder, component and file ---------------------------------------------------


@pytest.fixture
def sharded_copy(folders, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folders[1]["sharded"], copy)
    return copy


def _error(path: Path, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_model(path, **kw)
    assert "\n" not in str(info.value)
    return info.value


def test_index_naming_a_missing_shard(sharded_copy: Path) -> None:
    shard = sorted((sharded_copy / "text_encoder").glob("model-*.safetensors"))[0]
    shard.unlink()
    err = _error(sharded_copy)
    assert err.path == str(shard) and "missing shard" in str(err) and "model.safetensors.index.json" in str(err)


def test_index_cannot_point_outside_its_folder(sharded_copy: Path) -> None:
    index_file = sharded_copy / "vae" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../unet/" + index["weight_map"][key]
    index_file.write_text(json.dumps(index))
    err = _error(sharded_copy)
    assert err.path == str(index_file) and err.key == key


def test_index_naming_a_tensor_its_shard_lacks(sharded_copy: Path) -> None:
    index_file = sharded_copy / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["conv_in.mystery"] = shard
    index_file.write_text(json.dumps(index))
    err = _error(sharded_copy)
    assert err.key == "conv_in.mystery" and err.path == str(index_file.parent / shard)


def test_pickled_components_need_allow_pickle(folders, tmp_path: Path) -> None:
    _, out = folders
    copy = tmp_path / "bin"
    shutil.copytree(out["plain"], copy)
    weights = copy / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), copy / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    err = _error(copy)
    assert err.path == str(weights) and "text_encoder" in str(err) and "pytorch_model.bin" in str(err)
    assert "allow-pickle" in str(err)
    _same_tensors(open_model(copy, allow_pickle=True), open_folder(out["plain"]))
    assert folder_sha256(copy, allow_pickle=True) != folder_sha256(out["plain"])


def test_several_variants_and_no_plain_file_must_be_named(folders, tmp_path: Path) -> None:
    _, out = folders
    copy = tmp_path / "two"
    shutil.copytree(out["fp16"], copy)
    unet = copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.fp16.safetensors", unet / "diffusion_pytorch_model.bf16.safetensors")
    err = _error(copy)
    assert err.path == str(unet / "diffusion_pytorch_model.safetensors") and "bf16, fp16" in str(err)
    _same_tensors(open_model(copy, variant="bf16"), open_folder(out["plain"]))
    err = _error(copy, variant="int8")
    assert "unet" in str(err) and "'int8'" in str(err)

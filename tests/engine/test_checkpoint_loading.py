"""Opening model files, family detection, config inference, clear errors, hashes, memory and dtype.

Every file here is made by the test (tiny random models in the real single-file layout, or damaged copies of
them); the one large file (a few hundred MB) is written to tmp_path and loaded in a subprocess that measures its
own peak memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.checkpoint as checkpoint_mod
from engine.checkpoint import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    a1111_short_hash,
    file_sha256,
    open_state_dict,
)
from engine.families import detect_family
from engine.loading import load_checkpoint
from engine.text_encoder import TextEncoderConfig
from engine.unet import SD1_NUM_HEADS, UNetConfig, UNetModel
from engine.vae import VAEConfig
from engine.random_checkpoint import TINY_TEXT, TINY_UNET, TINY_VAE, random_sd1_state_dict, sd1_metadata
from tests.helpers import ROOT as REPO

TEXT_PREFIX = CLIP_PREFIX + "text_model."


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADFORGE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_sd1_state_dict(0)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory, tiny_sd) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(tiny_sd, str(path), metadata=sd1_metadata())
    return path


@pytest.fixture(scope="module")
def tiny_models(tiny_file: Path):
    return load_checkpoint(tiny_file)


def _save(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(sd, str(path), metadata=sd1_metadata() if metadata is None else metadata)
    return path


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _rename(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def _assert_weights_equal(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name].float(), tensor.float()), name


def _text_config(model) -> TextEncoderConfig:
    c = model.config
    assert c.hidden_act == "quick_gelu"
    return TextEncoderConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
    )


# ---- loading and family detection -------------------------------------------------------------------------


def test_tiny_sd1_loads_with_the_files_weights_and_configs(tiny_models, tiny_sd, tiny_file: Path) -> None:
    m = tiny_models
    assert m.family.name == "sd1" and m.family.supported and not m.is_inpainting
    assert m.unet.config == TINY_UNET
    assert _text_config(m.text_encoder) == TINY_TEXT
    assert m.vae.config == TINY_VAE
    _assert_weights_equal(m.unet, _sub(tiny_sd, UNET_PREFIX))
    _assert_weights_equal(m.text_encoder, _sub(tiny_sd, TEXT_PREFIX))
    _assert_weights_equal(m.vae, _sub(tiny_sd, VAE_PREFIX))
    assert m.checkpoint.path == tiny_file and m.checkpoint.name == "tiny" and m.vae_file is None
    assert not any(p.requires_grad for p in m.unet.parameters())


def test_older_clip_layout_without_text_model_level_loads(tmp_path: Path, tiny_sd) -> None:
    sd = _rename(tiny_sd, TEXT_PREFIX, CLIP_PREFIX)
    assert not any(k.startswith(TEXT_PREFIX) for k in sd) and any(k.startswith(CLIP_PREFIX) for k in sd)
    m = load_checkpoint(_save(tmp_path / "old.safetensors", sd))
    assert m.family.name == "sd1"
    _assert_weights_equal(m.text_encoder, _sub(sd, CLIP_PREFIX))


def test_nine_input_channels_is_sd1_inpaint(tmp_path: Path, tiny_sd) -> None:
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"  # 4 latent + 1 mask + 4 masked-image latent channels
    sd = {**tiny_sd, conv_in: torch.randn(TINY_UNET.model_channels, 9, 3, 3)}
    path = _save(tmp_path / "inpaint.safetensors", sd)
    assert detect_family(open_state_dict(path)).name == "sd1-inpaint"
    m = load_checkpoint(path)
    assert m.family.name == "sd1-inpaint" and m.is_inpainting
    assert m.unet.config == replace(TINY_UNET, in_channels=9)


def test_config_inference_is_read_from_the_file_not_assumed(tmp_path: Path) -> None:
    """A different topology (3 levels, 2 res blocks, no attention at full resolution, depth-2 transformers,
    3 heads of 16 in the text encoder) comes back exactly as it was built."""
    unet = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1, 2),
        num_heads=4,
        context_dim=48,
        transformer_depth=2,
    )
    text = TextEncoderConfig(vocab_size=49410, hidden_size=48, intermediate_size=50, num_layers=1, num_heads=3, max_position_embeddings=77)
    vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2)
    path = _save(tmp_path / "variant.safetensors", random_sd1_state_dict(3, unet=unet, text=text, vae=vae), sd1_metadata(unet, text))
    m = load_checkpoint(path)
    assert m.unet.config == unet
    assert _text_config(m.text_encoder) == text
    assert m.vae.config == vae


ATTN2_KV = (".attn2.to_k.weight", ".attn2.to_v.weight")


def _with_context_dim(sd: dict[str, torch.Tensor], context_dim: int) -> dict[str, torch.Tensor]:
    """Cross-attention k/v projections reading a context of another width (SD2: 1024, SDXL: 2048)."""
    return {k: (torch.zeros(v.shape[0], context_dim) if k.endswith(ATTN2_KV) else v) for k, v in sd.items()}


def _sd2_context(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _with_context_dim(sd, 1024)


def _sd2_linear(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # SD 2.x's SpatialTransformers use Linear proj_in / proj_out: 2-D weights instead of 1x1 convs.
    return {k: (v[:, :, 0, 0] if k.endswith((".proj_in.weight", ".proj_out.weight")) else v) for k, v in sd.items()}


def _sd2_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(sd, TEXT_PREFIX, "cond_stage_model.model.transformer.")


def _sdxl_conditioner(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(sd, CLIP_PREFIX, "conditioner.embedders.0.transformer.")


def _sdxl_label_emb(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        **sd,
        UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(TINY_UNET.time_embed_dim, 2816),
        UNET_PREFIX + "label_emb.0.0.bias": torch.zeros(TINY_UNET.time_embed_dim),
    }


def _sdxl_context(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _with_context_dim(sd, 2048)


@pytest.mark.parametrize(
    "make, family",
    [
        (_sd2_context, "sd2"),
        (_sd2_linear, "sd2"),
        (_sd2_openclip, "sd2"),
        (_sdxl_conditioner, "sdxl"),
        (_sdxl_label_emb, "sdxl"),
        (_sdxl_context, "sdxl"),
    ],
    ids=["sd2-context1024", "sd2-linear-proj-in", "sd2-openclip-keys", "sdxl-conditioner", "sdxl-label-emb", "sdxl-context2048"],
)
def test_sd2_and_sdxl_layouts_are_detected_and_half_files_refused(tmp_path: Path, tiny_sd, make, family: str) -> None:
    """Each piece of evidence alone picks the family; an SD 1.x file with only that piece changed is no whole model
    of it, and loading says what is wrong with the file rather than building a half of something."""
    path = _save(tmp_path / f"{family}.safetensors", make(tiny_sd))
    fam = detect_family(open_state_dict(path))
    assert fam.name == family and fam.supported
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_lora_file_is_refused_with_its_own_message(tmp_path: Path) -> None:
    sd = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
    }
    path = _save(tmp_path / "style-lora.safetensors", sd, {})
    assert detect_family(open_state_dict(path)).name == "lora"
    with pytest.raises(CheckpointError, match="LoRA file, not a checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("prefix", ["", VAE_PREFIX])
def test_vae_only_file_is_refused_with_its_own_message(tmp_path: Path, tiny_sd, prefix: str) -> None:
    sd = {prefix + k: v for k, v in _sub(tiny_sd, VAE_PREFIX).items()}
    path = _save(tmp_path / "vae.safetensors", sd, {})
    assert detect_family(open_state_dict(path)).name == "vae"
    with pytest.raises(CheckpointError, match="standalone VAE.*--vae") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_file_of_unrelated_tensors_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = _save(tmp_path / "other.safetensors", {"fc.weight": torch.zeros(2, 2)}, {})
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


# ---- errors that name the file (and key) ----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.mkdir()
    with pytest.raises(CheckpointError, match="directory") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_text_file_renamed_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "download.safetensors"
    path.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_tiny_file_shorter_than_a_header_length(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        open_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("where", ["half", "inside-header"])
def test_truncated_safetensors(tmp_path: Path, tiny_file: Path, where: str) -> None:
    data = tiny_file.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut = len(data) // 2 if where == "half" else header_end // 2
    assert (cut > header_end) == (where == "half")
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _header(data: bytes) -> tuple[int, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8 : 8 + n]


def test_corrupt_header_json(tmp_path: Path, tiny_file: Path) -> None:
    data = bytearray(tiny_file.read_bytes())
    data[8 + 10 : 8 + 30] = b"\xff" * 20  # garbage inside the JSON header, length unchanged
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_corrupt_header_entry_names_the_key(tmp_path: Path, tiny_file: Path) -> None:
    data = tiny_file.read_bytes()
    n, header = _header(data)
    broken = header.replace(b'"data_offsets"', b'"data_offsetz"', 1)  # same length, so the layout is unchanged
    damaged = [k for k, v in json.loads(broken).items() if k != "__metadata__" and "data_offsets" not in v]
    assert len(damaged) == 1
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(data[:8] + broken + data[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry") as info:
        open_state_dict(path)
    assert info.value.key == damaged[0] and f"'{damaged[0]}'" in str(info.value) and str(path) in str(info.value)


def _raw_safetensors(path: Path, header: bytes, length: int | None = None, size: int | None = None) -> Path:
    """A file with an 8-byte header length (``length``, default the header's) and ``header``; ``size`` extends it
    sparsely (no disk blocks), as a crafted file claiming a huge header would be."""
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header) if length is None else length) + header)
        if size is not None:
            f.truncate(size)
    return path


def test_huge_header_is_refused_before_a_byte_of_it_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 100 MB header probe: the length is checked against the cap first, so its JSON is never read."""
    n = checkpoint_mod.MAX_HEADER_BYTES + 1
    path = _raw_safetensors(tmp_path / "huge-header.safetensors", b'{"__metadata__": {"x": "', length=n, size=8 + n + 64)
    monkeypatch.setattr(checkpoint_mod.json, "loads", lambda *a, **k: pytest.fail("the header was parsed"))
    with pytest.raises(CheckpointError, match=rf"header of {n} bytes is over the {n - 1} byte limit") as info:
        open_state_dict(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert checkpoint_mod.MAX_HEADER_BYTES <= 16 * 1024 * 1024


def test_header_just_under_the_cap_is_still_parsed(tmp_path: Path) -> None:
    padding = b" " * (2 * 1024 * 1024)  # a 2 MB header: big LoRA training metadata, still a valid file
    a = torch.zeros(2)
    good = _save(tmp_path / "good.safetensors", {"a": a}, {})
    n, header = _header(good.read_bytes())
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", n + len(padding)) + header + padding + good.read_bytes()[8 + n :])
    assert torch.equal(open_state_dict(path)["a"], a)


@pytest.mark.parametrize("header", [b"[" * 200_000, b'{"a": ' + b"[" * 200_000, b'{"a":' * 5000])
def test_deeply_nested_header_is_a_one_line_error(tmp_path: Path, header: bytes) -> None:
    """The nested ``[[[...`` probe: a RecursionError in the JSON parser becomes a plain error naming the file."""
    path = _raw_safetensors(tmp_path / "nested.safetensors", header)
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header \((JSON nested too deep|not a JSON object)") as info:
        load_checkpoint(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_non_finite_data_offsets_name_the_key(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "inf.safetensors", b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}')
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry") as info:
        open_state_dict(path)
    assert info.value.key == "w"
    # A crafted key of 1 MB is cut in the message (kept whole in .key).
    long_key = "k" * 2**20
    path = _raw_safetensors(tmp_path / "long-key.safetensors", json.dumps({long_key: 1}).encode())
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry") as info:
        open_state_dict(path)
    assert info.value.key == long_key and len(str(info.value)) < 500


def test_inconsistent_header_offsets_are_refused(tmp_path: Path) -> None:
    """A header whose offsets do not tile the data is refused by the parser; the error still names the file."""
    a, b = torch.zeros(4), torch.ones(4)
    good = _save(tmp_path / "good.safetensors", {"a": a, "b": b}, {})
    data = good.read_bytes()
    n, header = _header(data)
    entries = json.loads(header)
    entries["b"]["data_offsets"] = [0, 16]  # overlaps "a"
    new_header = json.dumps(entries).encode()
    new_header += b" " * (-len(new_header) % 8)
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + n :])
    with pytest.raises(CheckpointError) as info:
        sd = open_state_dict(path)
        _ = (sd["a"], sd["b"])
    assert str(path) in str(info.value)


MISSING_KEYS = [
    UNET_PREFIX + "output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",  # read only when materialising
    UNET_PREFIX + "input_blocks.1.0.emb_layers.1.bias",
    UNET_PREFIX + "input_blocks.0.0.weight",  # read by family detection
    UNET_PREFIX + "middle_block.1.proj_in.weight",  # read by family detection
    UNET_PREFIX + "input_blocks.1.1.proj_in.weight",  # read by config inference (attention levels)
    UNET_PREFIX + "input_blocks.2.0.op.weight",  # read by config inference (level boundaries)
    UNET_PREFIX + "out.2.weight",  # read by config inference (out channels)
    TEXT_PREFIX + "embeddings.token_embedding.weight",
    TEXT_PREFIX + "encoder.layers.1.self_attn.k_proj.bias",
    VAE_PREFIX + "encoder.conv_in.weight",
    VAE_PREFIX + "decoder.mid.attn_1.q.weight",
]


@pytest.mark.parametrize("key", MISSING_KEYS, ids=lambda k: k.split(".", 2)[-1] if k.startswith("model.") else k)
def test_missing_tensor_names_its_full_key(tmp_path: Path, tiny_sd, key: str) -> None:
    assert key in tiny_sd
    path = _save(tmp_path / "partial.safetensors", {k: v for k, v in tiny_sd.items() if k != key})
    with pytest.raises(CheckpointError, match="missing tensor") as info:
        load_checkpoint(path)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and str(path) in str(info.value)


WRONG_SHAPE_KEYS = [
    UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight",
    UNET_PREFIX + "output_blocks.0.0.skip_connection.bias",
    UNET_PREFIX + "out.2.weight",  # its shape defines out_channels: named because its bias disagrees
    TEXT_PREFIX + "encoder.layers.0.mlp.fc2.weight",
    VAE_PREFIX + "decoder.up.1.block.0.conv1.weight",
]


@pytest.mark.parametrize("key", WRONG_SHAPE_KEYS, ids=lambda k: k.split(".", 2)[-1] if k.startswith("model.") else k)
def test_wrong_shape_names_its_key(tmp_path: Path, tiny_sd, key: str) -> None:
    sd = dict(tiny_sd)
    t = sd[key]
    sd[key] = torch.zeros((t.shape[0] + 1, *t.shape[1:]))
    path = _save(tmp_path / "bad-shape.safetensors", sd)
    with pytest.raises(CheckpointError, match="shape") as info:
        load_checkpoint(path)
    assert f"'{key}'" in str(info.value) and str(path) in str(info.value)
    stem = key.rpartition(".")[0]
    assert info.value.key in (key, stem + ".weight", stem + ".bias")


def test_unexpected_tensor_is_refused_not_ignored(tmp_path: Path, tiny_sd) -> None:
    key = UNET_PREFIX + "input_blocks.1.0.extra.weight"
    path = _save(tmp_path / "extra.safetensors", {**tiny_sd, key: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensor") as info:
        load_checkpoint(path)
    assert info.value.key == key


def test_text_encoder_width_must_match_unet_context(tmp_path: Path) -> None:
    sd = random_sd1_state_dict(0, text=replace(TINY_TEXT, hidden_size=48, num_heads=3))
    path = _save(tmp_path / "mixed.safetensors", sd, sd1_metadata(TINY_UNET, replace(TINY_TEXT, num_heads=3)))
    with pytest.raises(CheckpointError, match="48 wide.*expects 32") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


# ---- pickled checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth"])
def test_pickle_refused_without_allow_pickle(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"fc.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="--allow-pickle") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    # It says what --allow-pickle does and why it is off, in one line.
    message = str(info.value)
    assert "weights-only unpickling" in message and "can run code" in message and "refused by default" in message
    assert "\n" not in message


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "state_dict-wrapped"])
def test_ckpt_loads_with_allow_pickle(tmp_path: Path, tiny_sd, wrapped: bool) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_sd, "global_step": 470000, "epoch": 3} if wrapped else tiny_sd, path)
    m = load_checkpoint(path, allow_pickle=True)
    assert m.family.name == "sd1"
    # A pickle has no metadata: head counts fall back to SD1's 8 (U-Net) and CLIP's 64-wide heads (text).
    assert m.unet.config == TINY_UNET and TINY_UNET.num_heads == SD1_NUM_HEADS
    assert m.text_encoder.config.num_attention_heads == max(1, TINY_TEXT.hidden_size // 64)
    _assert_weights_equal(m.unet, _sub(tiny_sd, UNET_PREFIX))
    _assert_weights_equal(m.vae, _sub(tiny_sd, VAE_PREFIX))


def test_legacy_non_zip_ckpt_loads_with_allow_pickle(tmp_path: Path, tiny_sd) -> None:
    path = tmp_path / "old-format.ckpt"
    torch.save({"state_dict": tiny_sd}, path, _use_new_zipfile_serialization=False)
    _assert_weights_equal(load_checkpoint(path, allow_pickle=True).text_encoder, _sub(tiny_sd, TEXT_PREFIX))


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): the shape of a malicious .ckpt."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused_even_with_allow_pickle(tmp_path: Path, tiny_sd) -> None:
    path = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": tiny_sd, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="weights-only") as info:
        load_checkpoint(path, allow_pickle=True)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # torch's own advice (re-run with weights_only=False) is exactly what must not be done: not repeated.
    message = str(info.value)
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message
    assert "GLOBAL" in message and "never runs a pickle's code" in message
    # the payload is real: an unrestricted unpickler would have run it
    probe = tmp_path / "probe"
    torch.save({"payload": _RunsCode(str(probe))}, tmp_path / "probe.ckpt")
    torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert probe.is_dir()


def test_pickle_of_non_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    torch.save({"a": 1, "b": "text"}, path)
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        open_state_dict(path, allow_pickle=True)


# ---- separate VAE file --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [VAE_PREFIX, ""], ids=["first_stage_model-prefix", "bare-keys"])
def test_separate_vae_replaces_the_checkpoints(tmp_path: Path, tiny_file: Path, tiny_sd, prefix: str) -> None:
    vae_sd = {k: v * -0.5 + 0.25 for k, v in _sub(tiny_sd, VAE_PREFIX).items()}  # a VAE with other weights
    vae_sd_file = {prefix + k: v for k, v in vae_sd.items()}
    vae_path = _save(tmp_path / "vae-ft-mse.safetensors", vae_sd_file, {})
    m = load_checkpoint(tiny_file, vae_path=vae_path)
    decoder = {k: v for k, v in vae_sd.items() if k.startswith("decoder.")}
    state = m.vae.state_dict()
    for k, v in decoder.items():
        assert torch.equal(state[k], v), k
    key = "decoder.conv_out.weight"
    assert not torch.equal(state[key], tiny_sd[VAE_PREFIX + key])  # not the checkpoint's own VAE
    _assert_weights_equal(m.vae, vae_sd)
    assert m.vae_file is not None and m.vae_file.path == vae_path
    assert m.vae_file.sha256 == hashlib.sha256(vae_path.read_bytes()).hexdigest()
    assert m.vae_file.short_hash == m.vae_file.sha256[:10]
    assert m.checkpoint.sha256 == hashlib.sha256(tiny_file.read_bytes()).hexdigest()


# ---- hashes -------------------------------------------------------------------------------------------------


def test_sha256_short_hash_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_dir: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    real_sha256 = hashlib.sha256  # engine.checkpoint's hashlib is this module: keep the real one for our own sums
    want = real_sha256(path.read_bytes()).hexdigest()
    calls: list[int] = []

    def counting_sha256(*args, **kwargs):
        calls.append(1)
        return real_sha256(*args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.hashlib, "sha256", counting_sha256)

    assert file_sha256(path) == want and len(calls) == 1
    assert a1111_short_hash(want) == want[:10] and len(a1111_short_hash(want)) == 10
    assert (_cache_dir / "hashes.json").is_file()
    assert want in json.loads((_cache_dir / "hashes.json").read_text()).values()

    # Second call: served from the cache; hashing would now fail.
    def failing_sha256(*args, **kwargs):
        raise AssertionError("file was hashed again")

    monkeypatch.setattr(checkpoint_mod.hashlib, "sha256", failing_sha256)
    assert file_sha256(path) == want
    assert file_sha256(str(path)) == want  # same file, str path
    monkeypatch.setattr(checkpoint_mod.hashlib, "sha256", counting_sha256)

    # Size changes -> recomputed.
    with path.open("ab") as f:
        f.write(b"x")
    new = real_sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == new != want and len(calls) == 2

    # Same size, new content, mtime moved -> recomputed.
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    newer = real_sha256(bytes(data)).hexdigest()
    assert file_sha256(path) == newer and len(calls) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]"])
def test_unreadable_hash_cache_is_ignored(tmp_path: Path, _cache_dir: Path, content: str) -> None:
    _cache_dir.mkdir(parents=True, exist_ok=True)
    (_cache_dir / "hashes.json").write_text(content)
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    assert file_sha256(path) == hashlib.sha256(b"hello").hexdigest()
    assert file_sha256(path) == hashlib.sha256(b"hello").hexdigest()


def test_checkpoint_model_file_hash(tiny_models, tiny_file: Path) -> None:
    want = hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert tiny_models.checkpoint.sha256 == want
    assert tiny_models.checkpoint.short_hash == want[:10]


# ---- memory and dtype ---------------------------------------------------------------------------------------


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_float32_cpu_parameters_are_the_memory_mapped_file(tiny_models, tiny_file: Path) -> None:
    ranges = _file_mappings(tiny_file)
    assert ranges, "the checkpoint is not memory-mapped"
    for module in (tiny_models.unet, tiny_models.text_encoder, tiny_models.vae):
        for name, p in module.named_parameters():
            assert p.dtype == torch.float32
            ptr = p.data_ptr()
            assert any(lo <= ptr and ptr + p.numel() * p.element_size() <= hi for lo, hi in ranges), f"{name} was copied"


def test_bfloat16_loading(tiny_file: Path, tiny_sd) -> None:
    m = load_checkpoint(tiny_file, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    for module in (m.unet, m.text_encoder, m.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert m.text_encoder.embeddings.position_ids.dtype == torch.int64
    w = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
    assert torch.equal(m.unet.input_blocks[1][1].proj_in.weight, tiny_sd[w].to(torch.bfloat16))
    assert m.unet.dtype == torch.bfloat16


_MEMORY_PROBE = r"""
import gc, json, resource, sys
import torch
torch.set_num_threads(1)
from engine.loading import load_checkpoint

def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

big, tiny = sys.argv[1], sys.argv[2]
m = load_checkpoint(tiny)  # warm-up: lazy imports, tokenizer, first-call allocations
del m
gc.collect()
# Reset the peak mark so that it is the load's own. (ru_maxrss is not usable here: after fork+exec it keeps the
# forking parent's -- here pytest's -- peak, and clear_refs does not reset it; VmHWM is this process's own.)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status_kb("VmRSS")
m = load_checkpoint(big)
after_load, peak_load = status_kb("VmRSS"), status_kb("VmHWM")
n_bytes = 0
total = 0.0
for module in (m.unet, m.text_encoder, m.vae):
    for p in module.parameters():
        total += float(p.sum())  # page every weight in
        n_bytes += p.numel() * p.element_size()
print(json.dumps({"base_kb": base, "after_load_kb": after_load, "peak_load_kb": peak_load, "peak_kb": status_kb("VmHWM"),
                  "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "param_bytes": n_bytes, "family": m.family.name, "checksum": total}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_of_loading_a_large_checkpoint(tmp_path: Path, tiny_sd, tiny_file: Path) -> None:
    # The tiny topology with a 256-wide U-Net: about 260 MB of float32. Values do not matter here, only bytes.
    big_unet = replace(TINY_UNET, model_channels=256)
    with torch.device("meta"):
        shapes = {UNET_PREFIX + k: v.shape for k, v in UNetModel(big_unet).state_dict().items()}
    sd = {k: v for k, v in tiny_sd.items() if not k.startswith(UNET_PREFIX)}
    sd.update({k: torch.full(shape, 0.01) for k, shape in shapes.items()})
    path = tmp_path / "big.safetensors"
    save_file(sd, str(path), metadata=sd1_metadata(big_unet))
    del sd
    size = path.stat().st_size
    assert 200e6 < size < 320e6
    env = {**os.environ, "ADFORGE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), str(tiny_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["family"] == "sd1"
    assert r["param_bytes"] > 0.95 * size  # every weight was loaded (and then paged in)
    load_growth = (r["after_load_kb"] - r["base_kb"]) * 1024
    load_peak = (r["peak_load_kb"] - r["base_kb"]) * 1024
    peak_growth = (r["peak_kb"] - r["base_kb"]) * 1024
    print(
        f"\nfile {size / 1e6:.0f} MB: RSS +{load_growth / 1e6:.1f} MB after load_checkpoint (peak during it +{load_peak / 1e6:.1f} MB), "
        f"peak +{peak_growth / 1e6:.1f} MB after paging in every weight = {peak_growth / size:.2f}x file size"
    )
    # zero-copy: building the networks neither reads the weights into private memory nor copies them
    assert load_peak < 0.25 * size, r
    # even with every weight paged in, the process holds about one file's worth, not two
    assert peak_growth < 1.5 * size, r

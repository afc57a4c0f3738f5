"""Loading a single file keeps it memory-mapped (peak RSS growth under 1.2x the file), and the streaming
safetensors writer that lets full-size random files be written with bounded memory.

The memory check is the CI-sized version of bench/load_memory.py: a ~160 MB SDXL-layout file (every network of
the family, narrower) loaded in its own dtype in a fresh process. Memory only: tests never assert wall-clock time.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint_writer import SafetensorsWriter, save_checkpoint
from engine.loading import load_checkpoint
from engine.random_checkpoint import SDXL_SIZE_FEATURES, random_spec, random_state_dict, write_random, write_random_spec
from engine.text_encoder import TextEncoderConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from load_memory import measure_in_subprocess  # noqa: E402

# The SDXL layout (U-Net depths 0/2/10, CLIP-L + bigG with projection, full VAE topology) at narrow widths.
_FULL = random_spec("sdxl", "full")
_G = TextEncoderConfig(hidden_size=320, intermediate_size=1280, num_layers=3, num_heads=5, hidden_act="gelu",
                       projection_dim=320)
MEDIUM_SDXL = replace(
    _FULL,
    unet=replace(_FULL.unet, model_channels=64, context_dim=256 + _G.hidden_size,
                 transformer_depth_per_level=(0, 2, 2), transformer_depth_middle=2,
                 adm_in_channels=_G.projection_dim + SDXL_SIZE_FEATURES),
    text=TextEncoderConfig(hidden_size=256, intermediate_size=1024, num_layers=3, num_heads=4),
    text_2=_G,
    vae=replace(_FULL.vae, ch=32),
)


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_loading_in_the_files_dtype_keeps_it_memory_mapped(tmp_path):
    path = tmp_path / "medium-sdxl.safetensors"
    write_random_spec(path, MEDIUM_SDXL, dtype=torch.float16)
    size = path.stat().st_size
    assert 100e6 < size < 300e6  # big enough that a copy of the file would show over the process's noise
    r = measure_in_subprocess(path, "float16")
    assert r["file_bytes"] == size and r["parameters"] > 0
    # Parameters alias the memory-mapped tensors: only pages touched count, never a second copy.
    assert r["growth_bytes"] < 1.2 * size, r


def test_load_in_files_dtype_aliases_the_mapped_tensors(tmp_path):
    """The mechanism behind the bound, per tensor: every parameter of a same-dtype load sits in one mapping of the
    file, at the file's own offsets (no private copies); the OpenCLIP in_proj's q/k/v and the transposed
    text_projection are views into it as well."""
    path = Path(write_random(tmp_path / "tiny-sdxl.safetensors", "sdxl", "tiny", dtype=torch.float16))
    header, _ = _header(path)
    models = load_checkpoint(path, dtype=torch.float16)
    unet = dict(models.unet.named_parameters())
    offsets = {n: header["model.diffusion_model." + n]["data_offsets"][0] for n in unet}
    ref = next(iter(unet))
    for name, param in unet.items():
        assert param.data_ptr() - unet[ref].data_ptr() == offsets[name] - offsets[ref], name
    g = models.text_encoder_2.text_model.encoder.layers[0].self_attn
    in_proj = header["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]["data_offsets"][0]
    emb = header["conditioner.embedders.1.model.token_embedding.weight"]["data_offsets"][0]
    token = models.text_encoder_2.text_model.embeddings.token_embedding.weight
    assert g.q_proj.weight.data_ptr() - token.data_ptr() == in_proj - emb
    assert g.k_proj.weight.data_ptr() - g.q_proj.weight.data_ptr() == g.q_proj.weight.nbytes
    assert not models.text_encoder_2.text_projection.weight.is_contiguous()  # the file's [width, proj] through .T


# ---- streaming writer ---------------------------------------------------------------------------------------

def _mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "b.weight": torch.randn(3, 5, generator=gen).half(), "a.weight": torch.randn(7, generator=gen),
        "scale": torch.tensor(2.5), "ids": torch.arange(6).reshape(1, 6), "flag": torch.tensor([True, False]),
        "bf": torch.randn(2, 2, generator=gen).bfloat16(), "empty": torch.zeros(0, 4),
    }


def test_streaming_writer_matches_save_checkpoint(tmp_path):
    tensors = _mixed_tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    # One metadata key: safetensors' writer orders several keys by hash (differently from run to run).
    save_checkpoint(theirs, tensors, {"k": "v"})
    with SafetensorsWriter(ours, {n: t.to("meta") for n, t in tensors.items()}, {"k": "v"}) as w:
        for name in reversed(list(tensors)):  # any order
            w.write(name, tensors[name])
    assert ours.read_bytes() == theirs.read_bytes()
    assert not (tmp_path / "ours.safetensors.part").exists()
    with safe_open(str(ours), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


def test_streaming_writer_with_several_metadata_keys(tmp_path):
    tensors, meta = _mixed_tensors(), {"z": "1", "a": "2", "m": "3"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_checkpoint(theirs, tensors, meta)
    with SafetensorsWriter(ours, tensors, meta) as w:
        for name, t in tensors.items():
            w.write(name, t)
    (h1, d1), (h2, d2) = _header(ours), _header(theirs)
    assert h1 == h2 and d1 == d2
    assert (8 + len(ours.read_bytes()) - len(d1) - 8) % 8 == 0  # data section 8-byte aligned


def test_streaming_writer_refuses_mismatches_and_incomplete_files(tmp_path):
    path = tmp_path / "x.safetensors"
    layout = {"w": torch.empty(2, 3, dtype=torch.float16, device="meta"), "b": torch.empty(3, device="meta")}
    with pytest.raises(ValueError, match=r"'w' is torch.float32 \(2, 3\) but the header says torch.float16 \(2, 3\)"):
        with SafetensorsWriter(path, layout) as w:
            w.write("w", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"'b' is torch.float32 \(4,\) but the header says torch.float32 \(3,\)"):
        with SafetensorsWriter(path, layout) as w:
            w.write("b", torch.zeros(4))
    with pytest.raises(KeyError, match="not in this file's layout"):
        with SafetensorsWriter(path, layout) as w:
            w.write("c", torch.zeros(3))
    with pytest.raises(ValueError, match="already written"):
        with SafetensorsWriter(path, layout) as w:
            w.write("b", torch.zeros(3))
            w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsWriter(path, layout) as w:
            w.write("b", torch.zeros(3))
    assert not path.exists() and not (tmp_path / "x.safetensors.part").exists()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_write_random_streams_the_same_tensors(tmp_path, family, dtype):
    path = write_random(tmp_path / f"{family}.safetensors", family, "tiny", seed=5, dtype=dtype, inpaint=family == "sd2",
                        metadata={"extra": "1"})
    tensors, meta = random_state_dict(family, "tiny", seed=5, dtype=dtype, inpaint=family == "sd2")
    with safe_open(path, "pt") as f:
        assert f.metadata() == {**meta, "extra": "1"}
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            # Bit for bit (torch.equal would call two NaNs different and -0.0 equal to 0.0).
            assert got.reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), name
    models = load_checkpoint(path, dtype=dtype)  # and our loader takes it
    assert models.family.name.startswith(family)

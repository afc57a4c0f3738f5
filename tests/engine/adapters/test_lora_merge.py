"""Switching LoRA sets on a loaded model: exact return to the base weights, no-ops, nothing half-applied, hashes,
the in-memory fallback, and pixels against a checkpoint merged by hand."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import lora_merge
from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import AdapterError, AdapterFile, LoraUse
from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, CheckpointError, file_sha256
from engine.loading import BaseWeights, SafetensorsBaseWeights, load_checkpoint
from engine.pipeline import Pipeline
from engine.random_checkpoint import sd1_metadata
from tests.engine.adapters.lora_testfiles import (
    ATTN,
    TE_LAYER,
    differing,
    gen,
    kohya,
    lora_delta,
    lora_module,
    randn,
    snapshot,
    write,
)
from tests.helpers import arr, make_req


def file_a(folder: Path, amplitude: float = 0.1) -> Path:
    """A kohya LoRA over attention, feed-forward, projections, 3x3 convs and the text encoder."""
    g = gen(11)
    t: dict[str, torch.Tensor] = {}
    for block, width in (("down_blocks.0.attentions.0", 32), ("mid_block.attentions.0", 64), ("up_blocks.1.attentions.1", 32)):
        tb = f"{block}.transformer_blocks.0"
        for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
            t.update(lora_module(kohya("unet", f"{tb}.{m}"), g, width, width, 4, alpha=2.0, scale=amplitude))
        t.update(lora_module(kohya("unet", f"{tb}.ff.net.0.proj"), g, width * 8, width, 4, alpha=2.0, scale=amplitude))
        t.update(lora_module(kohya("unet", f"{tb}.ff.net.2"), g, width, width * 4, 4, alpha=2.0, scale=amplitude))
        t.update(lora_module(kohya("unet", f"{block}.proj_in"), g, width, width, 4, kernel=1, alpha=2.0, scale=amplitude))
    t.update(lora_module(kohya("unet", "down_blocks.1.resnets.0.conv1"), g, 64, 32, 4, kernel=3, alpha=1.0, scale=amplitude))
    for m, out, inp in (("self_attn.q_proj", 32, 32), ("self_attn.v_proj", 32, 32), ("mlp.fc1", 37, 32), ("mlp.fc2", 32, 37)):
        for layer in (0, 1):
            t.update(lora_module(kohya("te", f"text_model.encoder.layers.{layer}.{m}"), g, out, inp, 4, alpha=4.0,
                                 scale=amplitude))
    return write(folder / "style-a.safetensors", t, {"ss_network_module": "networks.lora"})


def file_b(folder: Path) -> Path:
    """LoHa and LoKr over some of A's modules and others."""
    g = gen(12)
    t: dict[str, torch.Tensor] = {}
    q = kohya("unet", f"{ATTN}.attn1.to_q")
    t.update({f"{q}.hada_w1_a": randn(g, 32, 2), f"{q}.hada_w1_b": randn(g, 2, 32), f"{q}.hada_w2_a": randn(g, 32, 2),
              f"{q}.hada_w2_b": randn(g, 2, 32), f"{q}.alpha": torch.tensor(1.0)})
    k = kohya("unet", "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    t.update({f"{k}.lokr_w1": randn(g, 4, 4), f"{k}.lokr_w2_a": randn(g, 16, 2), f"{k}.lokr_w2_b": randn(g, 2, 8),
              f"{k}.alpha": torch.tensor(1.0)})
    t.update(lora_module(kohya("te", f"{TE_LAYER}.self_attn.k_proj"), g, 32, 32, 2))
    return write(folder / "style-b.safetensors", t)


def use(path: Path, te: float = 1.0, unet: float = 1.0, sha256: str | None = None) -> LoraUse:
    return LoraUse(AdapterFile(path.stem, str(path), sha256), te=te, unet=unet)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_a_b_none_returns_bit_identical_base(tiny_checkpoint: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    models = load_checkpoint(tiny_checkpoint, dtype=dtype)
    assert isinstance(models.base_weights, SafetensorsBaseWeights)
    base = snapshot(models)
    merger = LoraMerger(models)
    a, b = use(file_a(tmp_path), te=0.8, unet=1.2), use(file_b(tmp_path))
    merger.activate([a])
    after_a = snapshot(models)
    assert len(differing(models, base)) > 30
    merger.activate([b])
    assert merger.active == (b,)
    assert 0 < len(differing(models, base)) < 10
    merger.activate([a, b])
    merger.activate([a])
    assert differing(models, after_a) == []  # A again: the same bits as the first time
    merger.activate(())
    assert merger.active == ()
    assert differing(models, base) == []


def test_bfloat16_merges_in_float32_and_rounds_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = file_a(tmp_path)
    models = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16)
    w = models.unet.input_blocks[1][1].transformer_blocks[0].ff.net[0].proj.weight
    before = w.detach().float().clone()
    LoraMerger(models).activate([use(path, unet=0.6)])
    t = load_file(str(path))
    stem = kohya("unet", f"{ATTN}.ff.net.0.proj")
    exact = before.double() + 0.6 * lora_delta(t, stem, w.shape)
    # Rounded once from (nearly) the exact sum: within half a bfloat16 step of it (8 significant bits).
    half_step = 0.5 * torch.exp2(torch.floor(torch.log2(exact.abs())) - 7)
    assert ((w.detach().double() - exact).abs() <= half_step * 1.001).all()
    assert not torch.equal(w.detach().float(), before)


def test_strength_zero_is_the_base_and_te_unet_strengths_split(tiny_checkpoint: Path, tmp_path: Path) -> None:
    models = load_checkpoint(tiny_checkpoint)
    base = snapshot(models)
    merger = LoraMerger(models)
    path = file_a(tmp_path)
    merger.activate([use(path, te=0.0, unet=0.0)])
    assert differing(models, base) == []
    merger.activate([use(path, te=0.0, unet=1.0)])
    changed = differing(models, base)
    assert changed and all(name.startswith("unet.") for name in changed)
    merger.activate([use(path, te=1.0, unet=0.0)])
    changed = differing(models, base)
    assert changed and all(name.startswith("te.") for name in changed)


def test_the_same_set_again_is_a_no_op(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = load_checkpoint(tiny_checkpoint)
    merger = LoraMerger(models)
    a, b = use(file_a(tmp_path)), use(file_b(tmp_path))
    merger.activate([a, b])
    calls = []
    monkeypatch.setattr(merger, "_plan", lambda loras: calls.append(loras) or [])
    merger.activate([b, a])  # the same set in another order
    merger.activate([a, b])
    assert calls == []
    merger.activate([use(Path(a.file.path), unet=0.5), b])  # another strength is another set
    assert len(calls) == 1


def test_a_refused_set_changes_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    models = load_checkpoint(tiny_checkpoint)
    merger = LoraMerger(models)
    a = use(file_a(tmp_path))
    merger.activate([a])
    state = snapshot(models)
    g = gen(13)
    bad = write(tmp_path / "bad.safetensors", {**lora_module(kohya("unet", f"{ATTN}.attn1.to_v"), g, 32, 32, 2),
                                               **lora_module(kohya("unet", "down_blocks.7.resnets.0.conv1"), g, 32, 32, 2)})
    with pytest.raises(AdapterError, match="down_blocks_7"):
        merger.activate([use(file_b(tmp_path)), use(bad)])
    assert differing(models, state) == []
    assert merger.active == (a,)


def test_a_merge_failing_half_way_leaves_the_base(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = load_checkpoint(tiny_checkpoint)
    base = snapshot(models)
    merger = LoraMerger(models)
    merger.activate([use(file_b(tmp_path))])
    calls = {"n": 0}
    real = lora_merge.WeightDelta.block

    def flaky(self, start, stop):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk gone")
        return real(self, start, stop)

    monkeypatch.setattr(lora_merge.WeightDelta, "block", flaky)
    with pytest.raises(OSError):
        merger.activate([use(file_a(tmp_path))])
    assert differing(models, base) == []
    assert merger.active == ()


def test_sha256_is_checked(tiny_checkpoint: Path, tmp_path: Path) -> None:
    models = load_checkpoint(tiny_checkpoint)
    merger = LoraMerger(models)
    path = file_a(tmp_path)
    merger.activate([use(path, sha256=file_sha256(path).upper())])
    with pytest.raises(AdapterError, match="sha256") as exc:
        merger.activate([use(path, sha256="0" * 64)])
    assert str(path) in str(exc.value)


def test_a_checkpoint_changed_since_loading_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copy(tiny_checkpoint, tmp_path / "model.safetensors"))
    models = load_checkpoint(copy)
    merger = LoraMerger(models)
    merger.activate([use(file_a(tmp_path))])
    state = snapshot(models)
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    with pytest.raises(CheckpointError, match="changed since it was loaded"):
        merger.activate(())
    assert differing(models, state) == []


def test_models_without_a_safetensors_file_keep_originals_in_memory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint))}, ckpt)
    models = load_checkpoint(ckpt, allow_pickle=True)
    assert type(models.base_weights) is BaseWeights
    base = snapshot(models)
    merger = LoraMerger(models)
    merger.activate([use(file_a(tmp_path))])
    merger.activate([use(file_b(tmp_path))])
    merger.activate(())
    assert differing(models, base) == []
    assert models.base_weights._saved == {}  # nothing kept once back at the base


def test_pixels_match_a_checkpoint_merged_by_hand(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = file_a(tmp_path, amplitude=0.4)  # strong enough to show in the tiny model's pixels
    t = load_file(str(path))
    sd = load_file(str(tiny_checkpoint))
    te_s, unet_s = 0.9, 1.1
    for name, stem in HAND_NAMES.items():
        key = (CLIP_PREFIX if name.startswith("text_model.") else UNET_PREFIX) + name + ".weight"
        s = te_s if stem.startswith("lora_te_") else unet_s
        sd[key] = (sd[key].double() + s * lora_delta(t, stem, sd[key].shape)).float()
    merged = tmp_path / "merged.safetensors"
    save_file(sd, str(merged), metadata=sd1_metadata())

    req = make_req(prompt="a red cube on a blue background", seed=3, width=32, height=32, steps=4)
    reference = Pipeline.load(merged, device="cpu", dtype="float32").generate([req()])[0].image
    models = load_checkpoint(tiny_checkpoint)
    plain = Pipeline(models).generate([req()])[0].image
    LoraMerger(models).activate([use(path, te=te_s, unet=unet_s)])
    with_lora = Pipeline(models).generate([req()])[0].image  # a new pipeline: its prompt cache predates the merge
    assert np.abs(arr(with_lora) - arr(reference)).max() <= 2
    assert np.abs(arr(plain) - arr(reference)).mean() > 3  # the LoRA does change the picture


# LDM module name -> kohya stem, for the modules file_a patches (written out, independent of lora_names).
HAND_NAMES = {
    **{f"{ldm}.transformer_blocks.0.{m}": kohya("unet", f"{d}.transformer_blocks.0.{m}")
       for d, ldm in (("down_blocks.0.attentions.0", "input_blocks.1.1"), ("mid_block.attentions.0", "middle_block.1"),
                      ("up_blocks.1.attentions.1", "output_blocks.3.1"))
       for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")},
    "input_blocks.1.1.proj_in": kohya("unet", "down_blocks.0.attentions.0.proj_in"),
    "middle_block.1.proj_in": kohya("unet", "mid_block.attentions.0.proj_in"),
    "output_blocks.3.1.proj_in": kohya("unet", "up_blocks.1.attentions.1.proj_in"),
    "input_blocks.3.0.in_layers.2": kohya("unet", "down_blocks.1.resnets.0.conv1"),
    **{f"text_model.encoder.layers.{i}.{m}": kohya("te", f"text_model.encoder.layers.{i}.{m}")
       for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2")},
}

"""Each LoRA-family module kind, merged by LoraMerger, equals the textbook formula merged by hand in the test.

The model is the tiny random SD1 checkpoint (loaded in float32); each file is written here in its trainer's key
spelling; expectations are computed in float64 from the file's own tensors and the checkpoint's base weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import AdapterFile, LoraUse
from engine.loading import load_checkpoint
from tests.engine.adapters.lora_testfiles import (
    ATTN,
    ATTN_LDM,
    TE_LAYER,
    checkpoint_parts,
    gen,
    kohya,
    lora_delta,
    lora_module,
    randn,
    write,
)

TOL = 2e-6  # float32 merge against a float64 reference, weights of order 0.1-1


@pytest.fixture
def models(tiny_checkpoint: Path):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    unet, te = checkpoint_parts(tiny_checkpoint)
    return {"unet": unet, "te": te}


def apply(models, path: Path, te: float = 1.0, unet: float = 1.0) -> LoraMerger:
    merger = LoraMerger(models)
    merger.activate([LoraUse(AdapterFile(path.stem, str(path)), te=te, unet=unet)])
    return merger


def params(models) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in models.unet.named_parameters()}
    out.update({f"te.{k}": v for k, v in models.text_encoder.named_parameters()})
    return out


def check(models, base, expected: dict[str, torch.Tensor]) -> None:
    """``expected``: part.param -> delta (already scaled by strength); every other parameter must be untouched."""
    for name, p in params(models).items():
        part, _, key = name.partition(".")
        want = base[part][key].double() + expected[name] if name in expected else base[part][key].double()
        err = (p.detach().double() - want).abs().max().item()
        assert err < (TOL if name in expected else 1e-30), f"{name}: off by {err}"


def test_kohya_lora_attention_projections_and_text_encoder(tmp_path: Path, models, base) -> None:
    g = gen(1)
    t: dict[str, torch.Tensor] = {}
    unet_mods = {  # diffusers name -> (LDM name, out, in, kernel, alpha)
        f"{ATTN}.attn1.to_q": (f"{ATTN_LDM}.attn1.to_q", 32, 32, 0, 2.0),
        f"{ATTN}.attn1.to_k": (f"{ATTN_LDM}.attn1.to_k", 32, 32, 0, None),  # no alpha: scale 1
        f"{ATTN}.attn1.to_v": (f"{ATTN_LDM}.attn1.to_v", 32, 32, 0, 0.0),  # alpha 0: scale 1 (kohya)
        f"{ATTN}.attn1.to_out.0": (f"{ATTN_LDM}.attn1.to_out.0", 32, 32, 0, 8.0),
        f"{ATTN}.attn2.to_k": (f"{ATTN_LDM}.attn2.to_k", 32, 32, 0, 3.0),
        f"{ATTN}.ff.net.0.proj": (f"{ATTN_LDM}.ff.net.0.proj", 256, 32, 0, 4.0),
        "down_blocks.0.attentions.0.proj_in": ("input_blocks.1.1.proj_in", 32, 32, 1, 4.0),  # 1x1 conv, [r, in, 1, 1]
    }
    stems = {}
    for dname, (ldm, out, inp, kernel, alpha) in unet_mods.items():
        stems[f"unet.{ldm}.weight"] = stem = kohya("unet", dname)
        t.update(lora_module(stem, g, out, inp, 4, kernel=kernel, alpha=alpha))
    # proj_out of the same block with a 2-D down/up (some trainers drop the 1x1 dims).
    stems["unet.input_blocks.1.1.proj_out.weight"] = stem = kohya("unet", "down_blocks.0.attentions.0.proj_out")
    t.update(lora_module(stem, g, 32, 32, 2, kernel=1, flat_1x1=True, alpha=1.0))
    for name, out, inp in (("self_attn.q_proj", 32, 32), ("self_attn.k_proj", 32, 32), ("self_attn.v_proj", 32, 32),
                           ("self_attn.out_proj", 32, 32), ("mlp.fc1", 37, 32), ("mlp.fc2", 32, 37)):
        stems[f"te.encoder.layers.1.{name}.weight"] = stem = kohya("te", f"{TE_LAYER}.{name}")
        t.update(lora_module(stem, g, out, inp, 3, alpha=1.5))
    path = write(tmp_path / "kohya.safetensors", t)
    apply(models, path, te=1.3, unet=0.7)
    expected = {}
    for name, stem in stems.items():
        part, _, key = name.partition(".")
        strength = 1.3 if part == "te" else 0.7
        expected[name] = strength * lora_delta(t, stem, base[part][key].shape)
    check(models, base, expected)


def test_kohya_ldm_names_reach_the_same_modules(tmp_path: Path, models, base) -> None:
    # SDXL-style LDM spellings, which some SD1 tools write too; the upsampler conv lives in the block's last slot.
    g = gen(2)
    t: dict[str, torch.Tensor] = {}
    mods = {f"{ATTN_LDM}.attn1.to_q": (32, 32, 0), "output_blocks.1.2.conv": (64, 64, 3), "input_blocks.2.0.op": (32, 32, 3),
            "middle_block.1.proj_out": (64, 64, 1), "middle_block.0.emb_layers.1": (64, 128, 0)}
    for ldm, (out, inp, kernel) in mods.items():
        t.update(lora_module(kohya("unet", ldm), g, out, inp, 4, kernel=kernel, alpha=2.0))
    path = write(tmp_path / "ldm.safetensors", t)
    apply(models, path, unet=0.5)
    check(models, base, {f"unet.{ldm}.weight": 0.5 * lora_delta(t, kohya("unet", ldm), base["unet"][f"{ldm}.weight"].shape)
                         for ldm in mods})


def test_locon_3x3_and_cp_decomposition(tmp_path: Path, models, base) -> None:
    g = gen(3)
    t: dict[str, torch.Tensor] = {}
    locon = {"down_blocks.1.resnets.0.conv1": "input_blocks.3.0.in_layers.2",
             "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
             "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.3.0.skip_connection"}
    for dname in locon:
        w = base["unet"][f"{locon[dname]}.weight"]
        t.update(lora_module(kohya("unet", dname), g, w.shape[0], w.shape[1], 4, kernel=w.shape[2], alpha=2.0))
    cp = kohya("unet", "mid_block.resnets.0.conv2")  # CP: down 1x1, mid [r, r, 3, 3], up 1x1
    down, mid, up = randn(g, 4, 64, 1, 1), randn(g, 4, 4, 3, 3), randn(g, 64, 4, 1, 1)
    t.update({f"{cp}.lora_down.weight": down, f"{cp}.lora_mid.weight": mid, f"{cp}.lora_up.weight": up,
              f"{cp}.alpha": torch.tensor(1.0)})
    path = write(tmp_path / "locon.safetensors", t)
    apply(models, path, unet=1.2)
    expected = {f"unet.{ldm}.weight": 1.2 * lora_delta(t, kohya("unet", d), base["unet"][f"{ldm}.weight"].shape)
                for d, ldm in locon.items()}
    # CP written out: dW[i,j,k,l] = sum_nm up[i,n] mid[n,m,k,l] down[m,j]
    dw = torch.einsum("in,nmkl,mj->ijkl", up.double()[:, :, 0, 0], mid.double(), down.double()[:, :, 0, 0])
    expected["unet.middle_block.0.out_layers.3.weight"] = 1.2 * (1.0 / 4) * dw
    check(models, base, expected)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A1111 lyco_helpers.make_weight_cp, written out: core x_1 wb, then x_0 wa."""
    temp = torch.einsum("ijkl,jr->irkl", t, wb)
    return torch.einsum("ijkl,ir->rjkl", temp, wa)


def test_loha_linear_conv_and_tucker(tmp_path: Path, models, base) -> None:
    g = gen(4)
    t: dict[str, torch.Tensor] = {}
    lin = kohya("unet", f"{ATTN}.attn1.to_q")
    t.update({f"{lin}.hada_w1_a": randn(g, 32, 4), f"{lin}.hada_w1_b": randn(g, 4, 32), f"{lin}.hada_w2_a": randn(g, 32, 4),
              f"{lin}.hada_w2_b": randn(g, 4, 32), f"{lin}.alpha": torch.tensor(2.0)})
    conv = kohya("unet", "down_blocks.0.resnets.0.conv1")  # 3x3 without Tucker: w_b flattened [r, in*9]
    t.update({f"{conv}.hada_w1_a": randn(g, 32, 4), f"{conv}.hada_w1_b": randn(g, 4, 32 * 9), f"{conv}.hada_w2_a": randn(g, 32, 4),
              f"{conv}.hada_w2_b": randn(g, 4, 32 * 9), f"{conv}.alpha": torch.tensor(1.0)})
    tk = kohya("unet", "down_blocks.0.resnets.0.conv2")  # Tucker: t [r, r, 3, 3], w_a [r, out], w_b [r, in]
    t.update({f"{tk}.hada_t1": randn(g, 4, 4, 3, 3), f"{tk}.hada_w1_a": randn(g, 4, 32), f"{tk}.hada_w1_b": randn(g, 4, 32),
              f"{tk}.hada_t2": randn(g, 4, 4, 3, 3), f"{tk}.hada_w2_a": randn(g, 4, 32), f"{tk}.hada_w2_b": randn(g, 4, 32)})
    path = write(tmp_path / "loha.safetensors", t)
    apply(models, path, unet=0.8)
    d = {k: v.double() for k, v in t.items()}
    dw_lin = (d[f"{lin}.hada_w1_a"] @ d[f"{lin}.hada_w1_b"]) * (d[f"{lin}.hada_w2_a"] @ d[f"{lin}.hada_w2_b"])
    dw_conv = (d[f"{conv}.hada_w1_a"] @ d[f"{conv}.hada_w1_b"]) * (d[f"{conv}.hada_w2_a"] @ d[f"{conv}.hada_w2_b"])
    dw_tk = _cp(d[f"{tk}.hada_t1"], d[f"{tk}.hada_w1_a"], d[f"{tk}.hada_w1_b"]) * _cp(
        d[f"{tk}.hada_t2"], d[f"{tk}.hada_w2_a"], d[f"{tk}.hada_w2_b"])
    check(models, base, {
        f"unet.{ATTN_LDM}.attn1.to_q.weight": 0.8 * (2.0 / 4) * dw_lin,
        "unet.input_blocks.1.0.in_layers.2.weight": 0.8 * (1.0 / 4) * dw_conv.reshape(32, 32, 3, 3),
        "unet.input_blocks.1.0.out_layers.3.weight": 0.8 * dw_tk,  # no alpha: scale 1
    })


def test_lokr_factored_full_and_tucker(tmp_path: Path, models, base) -> None:
    g = gen(5)
    t: dict[str, torch.Tensor] = {}
    a = kohya("unet", f"{ATTN}.attn1.to_k")  # w1 full [4, 4], w2 = w2_a @ w2_b [8, 8]: scale alpha / r(w2_b)
    t.update({f"{a}.lokr_w1": randn(g, 4, 4), f"{a}.lokr_w2_a": randn(g, 8, 2), f"{a}.lokr_w2_b": randn(g, 2, 8),
              f"{a}.alpha": torch.tensor(1.0)})
    b = kohya("unet", f"{ATTN}.ff.net.0.proj")  # both factored [256, 32] = kron([16, 4], [16, 8]); rank from w1_b
    t.update({f"{b}.lokr_w1_a": randn(g, 16, 3), f"{b}.lokr_w1_b": randn(g, 3, 4), f"{b}.lokr_w2_a": randn(g, 16, 3),
              f"{b}.lokr_w2_b": randn(g, 3, 8), f"{b}.alpha": torch.tensor(6.0)})
    c = kohya("unet", f"{ATTN}.attn1.to_v")  # both full: scale 1 whatever alpha says (LyCORIS)
    t.update({f"{c}.lokr_w1": randn(g, 2, 4), f"{c}.lokr_w2": randn(g, 16, 8), f"{c}.alpha": torch.tensor(7.0)})
    dconv = kohya("unet", "down_blocks.0.downsamplers.0.conv")  # conv, w2 full 4-D [8, 4, 3, 3]
    t.update({f"{dconv}.lokr_w1": randn(g, 4, 8), f"{dconv}.lokr_w2": randn(g, 8, 4, 3, 3)})
    tk = kohya("unet", "down_blocks.1.resnets.0.conv2")  # conv with Tucker w2: t2 [r, r, 3, 3], w2_a [r, out2], w2_b [r, in2]
    t.update({f"{tk}.lokr_w1": randn(g, 4, 4), f"{tk}.lokr_t2": randn(g, 2, 2, 3, 3), f"{tk}.lokr_w2_a": randn(g, 2, 16),
              f"{tk}.lokr_w2_b": randn(g, 2, 16), f"{tk}.alpha": torch.tensor(1.0)})
    path = write(tmp_path / "lokr.safetensors", t)
    apply(models, path, unet=1.5)
    d = {k: v.double() for k, v in t.items()}
    conv_kron = torch.kron(d[f"{dconv}.lokr_w1"][:, :, None, None], d[f"{dconv}.lokr_w2"])  # A1111's make_kron
    tk_w2 = _cp(d[f"{tk}.lokr_t2"], d[f"{tk}.lokr_w2_a"], d[f"{tk}.lokr_w2_b"])
    check(models, base, {
        f"unet.{ATTN_LDM}.attn1.to_k.weight": 1.5 * (1.0 / 2) * torch.kron(d[f"{a}.lokr_w1"], d[f"{a}.lokr_w2_a"] @ d[f"{a}.lokr_w2_b"]),
        f"unet.{ATTN_LDM}.ff.net.0.proj.weight": 1.5 * (6.0 / 3) * torch.kron(
            d[f"{b}.lokr_w1_a"] @ d[f"{b}.lokr_w1_b"], d[f"{b}.lokr_w2_a"] @ d[f"{b}.lokr_w2_b"]),
        f"unet.{ATTN_LDM}.attn1.to_v.weight": 1.5 * torch.kron(d[f"{c}.lokr_w1"], d[f"{c}.lokr_w2"]),
        "unet.input_blocks.2.0.op.weight": 1.5 * conv_kron,
        "unet.input_blocks.3.0.out_layers.3.weight": 1.5 * (1.0 / 2) * torch.kron(d[f"{tk}.lokr_w1"][:, :, None, None], tk_w2),
    })


def test_lycoris_full_diff_with_bias(tmp_path: Path, models, base) -> None:
    g = gen(6)
    stem = kohya("te", f"{TE_LAYER}.mlp.fc1")
    diff, diff_b = randn(g, 37, 32), randn(g, 37)
    path = write(tmp_path / "full.safetensors", {f"{stem}.diff": diff, f"{stem}.diff_b": diff_b})
    apply(models, path, te=0.5)
    check(models, base, {"te.encoder.layers.1.mlp.fc1.weight": 0.5 * diff.double(),
                         "te.encoder.layers.1.mlp.fc1.bias": 0.5 * diff_b.double()})


def test_peft_names_with_metadata_alpha(tmp_path: Path, models, base) -> None:
    g = gen(7)
    t: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    # diffusers' save_lora_weights metadata: alpha 8 over rank 4, except attn2 modules (alpha_pattern) at 2.
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_q": 2},
                                                 "text_encoder.r": 4, "text_encoder.lora_alpha": 4})}
    for dname, ldm, scale in ((f"{ATTN}.attn1.to_q", f"{ATTN_LDM}.attn1.to_q", 2.0), (f"{ATTN}.attn2.to_q", f"{ATTN_LDM}.attn2.to_q", 0.5)):
        a, b = randn(g, 4, 32), randn(g, 32, 4)
        t.update({f"unet.{dname}.lora_A.weight": a, f"unet.{dname}.lora_B.weight": b})
        expected[f"unet.{ldm}.weight"] = 0.9 * scale * (b.double() @ a.double())
    a, b = randn(g, 4, 32), randn(g, 32, 4)
    t.update({f"text_encoder.{TE_LAYER}.self_attn.q_proj.lora_A.weight": a, f"text_encoder.{TE_LAYER}.self_attn.q_proj.lora_B.weight": b})
    expected["te.encoder.layers.1.self_attn.q_proj.weight"] = 1.1 * (b.double() @ a.double())
    path = write(tmp_path / "peft.safetensors", t, meta)
    apply(models, path, te=1.1, unet=0.9)
    check(models, base, expected)


def test_older_diffusers_spellings(tmp_path: Path, models, base) -> None:
    # Attention processors (to_out_lora -> to_out.0, the text encoder's to_v_lora -> v_proj), lora.down/up with an
    # .alpha, and the text encoder's lora_linear_layer; no metadata, so scale 1 where no alpha is stored.
    g = gen(8)
    t: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    d_out, u_out = randn(g, 2, 32), randn(g, 32, 2)
    t.update({f"unet.{ATTN}.attn1.processor.to_out_lora.down.weight": d_out, f"unet.{ATTN}.attn1.processor.to_out_lora.up.weight": u_out})
    expected[f"unet.{ATTN_LDM}.attn1.to_out.0.weight"] = u_out.double() @ d_out.double()
    d_k, u_k = randn(g, 2, 32), randn(g, 32, 2)
    t.update({f"unet.{ATTN}.attn2.to_k.lora.down.weight": d_k, f"unet.{ATTN}.attn2.to_k.lora.up.weight": u_k,
              f"unet.{ATTN}.attn2.to_k.alpha": torch.tensor(1.0)})
    expected[f"unet.{ATTN_LDM}.attn2.to_k.weight"] = 0.5 * (u_k.double() @ d_k.double())
    d_fc, u_fc = randn(g, 2, 32), randn(g, 37, 2)
    t.update({f"text_encoder.{TE_LAYER}.mlp.fc1.lora_linear_layer.down.weight": d_fc,
              f"text_encoder.{TE_LAYER}.mlp.fc1.lora_linear_layer.up.weight": u_fc})
    expected["te.encoder.layers.1.mlp.fc1.weight"] = u_fc.double() @ d_fc.double()
    d_v, u_v = randn(g, 2, 32), randn(g, 32, 2)
    t.update({f"text_encoder.{TE_LAYER}.self_attn.to_v_lora.down.weight": d_v, f"text_encoder.{TE_LAYER}.self_attn.to_v_lora.up.weight": u_v})
    expected["te.encoder.layers.1.self_attn.v_proj.weight"] = u_v.double() @ d_v.double()
    apply(models, write(tmp_path / "old-diffusers.safetensors", t))
    check(models, base, expected)


def test_peft_adapter_config_beside_adapter_model(tmp_path: Path, models, base) -> None:
    g = gen(9)
    folder = tmp_path / "my-peft-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "use_rslora": True}))
    a, b = randn(g, 4, 32), randn(g, 32, 4)
    path = write(folder / "adapter_model.safetensors",
                 {f"base_model.model.{ATTN}.attn1.to_q.lora_A.weight": a, f"base_model.model.{ATTN}.attn1.to_q.lora_B.weight": b})
    apply(models, path)
    check(models, base, {f"unet.{ATTN_LDM}.attn1.to_q.weight": (16 / 4 ** 0.5) * (b.double() @ a.double())})

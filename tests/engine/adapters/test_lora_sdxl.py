"""LoRAs on SDXL: kohya files (te1 = CLIP-L, te2 = bigG, U-Net in LDM or diffusers names) and diffusers/PEFT files
merge into all three networks of a tiny SDXL checkpoint exactly as written out by hand; strength 0 is the base;
switching sets returns every weight bit for bit (bigG has no 1:1 file tensors: its originals are kept in memory);
files of the other family are refused naming both families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adapters.lora_merge import LoraMerger
from engine.adapters.lora_names import TEXT_ENCODER, TEXT_ENCODER_2, UNET, ModuleIndex, diffusers_unet_blocks
from engine.adapters.refs import AdapterError, AdapterFile, LoraUse
from engine.loading import LoadedModels, SafetensorsBaseWeights, load_checkpoint
from engine.random_checkpoint import write_random
from tests.engine.adapters.lora_testfiles import gen, kohya, lora_delta, lora_module, write

# Tiny SDXL U-Net (engine.random_checkpoint): levels (1, 2, 2) with attention at levels 1 and 2, transformer depth
# (0, 1, 2), middle depth 2. Level 2's first attention block is input_blocks.5.1 = down_blocks.2.attentions.0.
DEEP = "input_blocks.5.1.transformer_blocks.1"  # the second transformer block of a depth-2 attention
DEEP_DIFFUSERS = "down_blocks.2.attentions.0.transformer_blocks.1"
L1 = "input_blocks.3.1"  # level 1 (SDXL's input_blocks.4.1): depth 1
L1_DIFFUSERS = "down_blocks.1.attentions.0"
MID = "middle_block.1.transformer_blocks.1"
UP = "output_blocks.0.1.transformer_blocks.1"  # up_blocks.0.attentions.0 (deepest level first)
SDXL_META = {"ss_base_model_version": "sdxl_base_v1-0"}

# (part, path in our network (no "text_model." for CLIP-L, with it for bigG), path as the LoRA file spells it)
UNET_MODULES = [
    f"{DEEP}.attn1.to_q", f"{DEEP}.attn2.to_k", f"{DEEP}.ff.net.2", f"{L1}.proj_in",
    f"{L1}.transformer_blocks.0.attn2.to_v", f"{MID}.attn1.to_out.0", f"{UP}.attn2.to_q", "label_emb.0.0",
]
TE1_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.2.mlp.fc1"]
TE2_MODULES = ["text_model.encoder.layers.1.self_attn.k_proj", "text_model.encoder.layers.2.mlp.fc2"]


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_random(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors", "sdxl", seed=3))


@pytest.fixture()
def models(sdxl_file: Path) -> LoadedModels:
    return load_checkpoint(sdxl_file)


def networks(m: LoadedModels) -> dict[str, torch.nn.Module]:
    assert m.text_encoder_2 is not None
    return {UNET: m.unet, TEXT_ENCODER: m.text_encoder, TEXT_ENCODER_2: m.text_encoder_2}


def snapshot(m: LoadedModels) -> dict[str, torch.Tensor]:
    return {f"{part}:{k}": v.detach().clone() for part, net in networks(m).items() for k, v in net.named_parameters()}


def changed(m: LoadedModels, before: dict[str, torch.Tensor]) -> set[str]:
    now = snapshot(m)
    return {k for k, v in before.items() if not torch.equal(v, now[k])}


def shape_of(m: LoadedModels, part: str, module: str) -> torch.Size:
    return dict(networks(m)[part].named_modules())[module].weight.shape


def kohya_file(m: LoadedModels, path: Path, seed: int, *, unet_names: str = "ldm") -> tuple[Path, dict, dict]:
    """A kohya SDXL LoRA over UNET_MODULES / TE1_MODULES / TE2_MODULES; also returns its tensors and
    {(part, module): file stem}."""
    g = gen(seed)
    to_diffusers = {ldm: d for d, ldm in diffusers_unet_blocks(m.unet.config).items()}
    t: dict[str, torch.Tensor] = {}
    stems: dict[tuple[str, str], str] = {}
    for part, modules in ((UNET, UNET_MODULES), (TEXT_ENCODER, TE1_MODULES), (TEXT_ENCODER_2, TE2_MODULES)):
        for module in modules:
            spelled = module
            if part == UNET and unet_names == "diffusers":
                block = next(b for b in sorted(to_diffusers, key=len, reverse=True) if module == b or module.startswith(b + "."))
                spelled = to_diffusers[block] + module[len(block):]
            elif part != UNET:
                spelled = "text_model." + module.removeprefix("text_model.")
            stem = kohya({UNET: "unet", TEXT_ENCODER: "te1", TEXT_ENCODER_2: "te2"}[part], spelled)
            out, inp = shape_of(m, part, module)
            t.update(lora_module(stem, g, out, inp, 4, alpha=2.0 + len(stems) % 3))
            stems[(part, module)] = stem
    return write(path, t, SDXL_META), t, stems


def use(path: Path, te: float = 1.0, unet: float = 1.0) -> LoraUse:
    return LoraUse(AdapterFile(path.stem, str(path)), te=te, unet=unet)


def test_index_resolves_all_spellings_of_sdxl_modules(models: LoadedModels) -> None:
    index = ModuleIndex(models.unet, models.text_encoder, models.text_encoder_2)
    deep = index.resolve(UNET, f"{DEEP}.attn1.to_q".replace(".", "_"), dotted=False)
    assert deep is not None and deep.module == f"{DEEP}.attn1.to_q"
    assert index.resolve(UNET, f"{DEEP_DIFFUSERS}.attn1.to_q".replace(".", "_"), dotted=False) == deep
    assert index.resolve(UNET, f"{DEEP_DIFFUSERS}.attn1.to_q", dotted=True) == deep
    # SDXL-style level 1: no attention at level 0, so down_blocks.1.attentions.0 is input_blocks.3.1 here
    assert index.resolve(UNET, f"{L1_DIFFUSERS}.proj_in", dotted=True).module == f"{L1}.proj_in"  # type: ignore[union-attr]
    assert index.resolve(UNET, "add_embedding.linear_1", dotted=True).module == "label_emb.0.0"  # type: ignore[union-attr]
    assert index.resolve(UNET, "down_blocks_0_attentions_0_proj_in", dotted=False) is None  # level 0 has none
    up = index.resolve(UNET, "up_blocks_0_upsamplers_0_conv", dotted=False)
    assert up is not None and up.module == "output_blocks.1.2.conv"
    te2 = index.resolve(TEXT_ENCODER_2, "text_model_encoder_layers_1_self_attn_k_proj", dotted=False)
    assert te2 is not None and te2.module == "text_model.encoder.layers.1.self_attn.k_proj"
    assert index.resolve(TEXT_ENCODER_2, "text_model.encoder.layers.1.self_attn.k_proj", dotted=True) == te2
    te1 = index.resolve(TEXT_ENCODER, "text_model_encoder_layers_0_self_attn_q_proj", dotted=False)
    assert te1 is not None and te1.module == "encoder.layers.0.self_attn.q_proj"


def test_kohya_sdxl_lora_merges_like_the_hand_written_deltas(models: LoadedModels, tmp_path: Path) -> None:
    before = snapshot(models)
    path, t, stems = kohya_file(models, tmp_path / "xl.safetensors", 1)
    LoraMerger(models).activate([use(path, te=0.7, unet=1.3)])
    params = {part: dict(net.named_parameters()) for part, net in networks(models).items()}
    want_changed = set()
    for (part, module), stem in stems.items():
        name = f"{module}.weight"
        want_changed.add(f"{part}:{name}")
        base = before[f"{part}:{name}"]
        strength = 1.3 if part == UNET else 0.7
        want = (base.double() + strength * lora_delta(t, stem, base.shape)).float()
        torch.testing.assert_close(params[part][name].detach(), want, rtol=0, atol=2e-6)
    assert changed(models, before) == want_changed  # nothing else moved, in none of the three networks


def test_diffusers_unet_names_merge_the_same_as_ldm_names(sdxl_file: Path, tmp_path: Path) -> None:
    a, b = load_checkpoint(sdxl_file), load_checkpoint(sdxl_file)
    ldm, _, _ = kohya_file(a, tmp_path / "ldm.safetensors", 2)
    diff, _, _ = kohya_file(b, tmp_path / "diff.safetensors", 2, unet_names="diffusers")
    LoraMerger(a).activate([use(ldm)])
    LoraMerger(b).activate([use(diff)])
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_peft_sdxl_names_reach_all_three_networks(sdxl_file: Path, tmp_path: Path) -> None:
    """diffusers' save_lora_weights spelling (unet. / text_encoder. / text_encoder_2.) against the same kohya file."""
    a, b = load_checkpoint(sdxl_file), load_checkpoint(sdxl_file)
    g = gen(5)
    kohya_t: dict[str, torch.Tensor] = {}
    peft_t: dict[str, torch.Tensor] = {}
    cases = [(UNET, f"{DEEP}.attn2.to_k", f"unet.{DEEP_DIFFUSERS}.attn2.to_k", f"{DEEP_DIFFUSERS}.attn2.to_k"),
             (TEXT_ENCODER, TE1_MODULES[0], f"text_encoder.text_model.{TE1_MODULES[0]}", f"text_model.{TE1_MODULES[0]}"),
             (TEXT_ENCODER_2, TE2_MODULES[0], f"text_encoder_2.{TE2_MODULES[0]}", TE2_MODULES[0])]
    for part, module, peft, spelled in cases:
        out, inp = shape_of(a, part, module)
        stem = kohya({UNET: "unet", TEXT_ENCODER: "te1", TEXT_ENCODER_2: "te2"}[part], spelled)
        kohya_t.update(lora_module(stem, g, out, inp, 2))
        peft_t[f"{peft}.lora_A.weight"] = kohya_t[f"{stem}.lora_down.weight"]
        peft_t[f"{peft}.lora_B.weight"] = kohya_t[f"{stem}.lora_up.weight"]
    before = snapshot(a)
    LoraMerger(a).activate([use(write(tmp_path / "k.safetensors", kohya_t, SDXL_META))])
    LoraMerger(b).activate([use(write(tmp_path / "p.safetensors", peft_t))])
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {k.split(":")[0] for k in changed(a, before)} == {UNET, TEXT_ENCODER, TEXT_ENCODER_2}


def test_strength_zero_and_switching_return_the_base_bit_for_bit(models: LoadedModels, tmp_path: Path) -> None:
    assert isinstance(models.base_weights, SafetensorsBaseWeights)
    assert TEXT_ENCODER_2 not in models.base_weights.keys  # bigG: no 1:1 file tensors, so the in-memory fallback
    base = snapshot(models)
    a, _, _ = kohya_file(models, tmp_path / "a.safetensors", 7)
    b, _, _ = kohya_file(models, tmp_path / "b.safetensors", 8)
    merger = LoraMerger(models)
    merger.activate([use(a, te=0.0, unet=0.0)])
    assert not changed(models, base)
    merger.activate([use(a)])
    after_a = snapshot(models)
    assert {k.split(":")[0] for k in changed(models, base)} == {UNET, TEXT_ENCODER, TEXT_ENCODER_2}
    merger.activate([])
    assert not changed(models, base)
    merger.activate([use(a)])
    assert not changed(models, after_a)  # merging again gives the same bits
    merger.activate([use(b, te=0.5)])
    merger.activate([use(a), use(b)])
    merger.activate([])
    assert not changed(models, base)
    assert not models.base_weights._saved  # nothing kept once back at the base


def test_lora_of_the_other_family_is_refused_naming_both(models: LoadedModels, tiny_checkpoint: Path, tmp_path: Path) -> None:
    sd1 = load_checkpoint(tiny_checkpoint)
    g = gen(9)
    sd1_lora = write(tmp_path / "sd1.safetensors", {
        **lora_module(kohya("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), g, 32, 32, 2),
        **lora_module(kohya("te", "text_model.encoder.layers.0.self_attn.q_proj"), g, 32, 32, 2)})
    xl_lora, _, _ = kohya_file(models, tmp_path / "xl.safetensors", 10)
    base = snapshot(models)
    with pytest.raises(AdapterError, match=r"for SD 1\.x models; the loaded model is SDXL") as err:
        LoraMerger(models).activate([use(sd1_lora)])
    assert "sd1.safetensors" in str(err.value)
    assert not changed(models, base)
    with pytest.raises(AdapterError, match=r"for SDXL models; the loaded model is SD 1\.x") as err:
        LoraMerger(sd1).activate([use(xl_lora)])
    assert "xl.safetensors" in str(err.value)

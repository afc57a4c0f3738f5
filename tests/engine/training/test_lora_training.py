"""LoRA training on the tiny random models: it learns, it resumes exactly, and its file loads in our engine and in
diffusers with the same effect as the in-memory layers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.adapters.lora_file import describe_lora, open_lora
from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import AdapterFile, LoraUse
from engine.conditioning import PromptEncoder
from engine.loading import load_checkpoint
from engine.random_checkpoint import write_random
from engine.schedule import DiscreteSchedule
from engine.training.caption_encoding import encode_captions, family_encoding
from engine.training.lora_export import export_lora
from engine.training.diffusion_step import checkpoint_blocks, uncheckpoint_blocks
from engine.training.lora_trainer import LoraTrainingConfig, cache_latents, refuse_unsupported, train_lora
from tests.engine.training.helpers import Killed, kill_at, product_images

CONFIG = LoraTrainingConfig(rank=4, resolution=128, steps=6, batch_size=2, save_every=2, lr=1e-3, text_lr=1e-3, seed=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return product_images(tmp_path_factory.mktemp("product"), [(192, 144), (144, 192), (160, 160), (256, 128)],
                          "zwx bottle, on a table", min_side=128)


@pytest.fixture(scope="module")
def trained(models, images, tmp_path_factory: pytest.TempPathFactory):
    return train_lora(models, images, CONFIG, state_dir=tmp_path_factory.mktemp("state"))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_caption_encoding_equals_the_pipelines(family: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tiny_checkpoint if family == "sd1" else write_random(tmp_path / "sd2.safetensors", family="sd2")
    m = load_checkpoint(path)
    encoding = family_encoding(m)
    captions = ["zwx bottle, (on a table:1.3)", "zwx bottle " + "word " * 90]  # the second takes two chunks
    ours = encode_captions(m.text_encoder, m.tokenizer, encoding, captions)
    ref = PromptEncoder(m.text_encoder, m.tokenizer, m.device, m.dtype, encoding=encoding).encode_batch(captions)
    assert ours.shape == ref.shape == (2, 154, m.text_encoder.config.hidden_size)
    # Equal up to float rounding: we run all captions' chunks as one batch, the pipeline one prompt at a time.
    assert (ours - ref).abs().max() < 1e-5


def test_training_lowers_the_loss_on_fixed_noise(models, images, trained, tmp_path: Path) -> None:
    assert trained.buckets == {(144, 112): 1, (112, 144): 1, (128, 128): 1, (160, 80): 1}
    from engine.training.buckets import assign_buckets, make_buckets
    assignment = assign_buckets([(i.width, i.height) for i in images.items], make_buckets(128, 16))
    latents = cache_latents(models, images, assignment)
    ac = DiscreteSchedule.sd1().alphas_cumprod.float()
    g = torch.Generator().manual_seed(99)
    cases = [(latents[i], images.items[i].caption, t, torch.randn(latents[i].shape, generator=g))
             for i in latents for t in (50, 250, 450, 650, 850)]

    @torch.no_grad()
    def loss() -> float:
        total = 0.0
        for x0, caption, t, noise in cases:
            a = ac[t]
            context = encode_captions(models.text_encoder, models.tokenizer, family_encoding(models), [caption])
            pred = models.unet((a.sqrt() * x0 + (1 - a).sqrt() * noise)[None], torch.tensor([float(t)]), context)
            total += torch.nn.functional.mse_loss(pred[0], noise).item()
        return total / len(cases)

    base = loss()
    result = train_lora(models, images, LoraTrainingConfig(rank=4, resolution=128, steps=30, lr=3e-3, text_lr=1e-3, seed=1),
                        state_dir=tmp_path / "state")
    result.network.attach()
    try:
        after = loss()
    finally:
        result.network.detach()
    assert loss() == base  # detached: the base model is untouched
    print(f"fixed-noise loss {base:.4f} -> {after:.4f}")
    assert after < 0.97 * base, (base, after)


def test_killed_run_resumes_to_identical_weights(models, images, trained, tmp_path: Path) -> None:
    steps_seen: list[int] = []
    with pytest.raises(Killed):
        train_lora(models, images, CONFIG, state_dir=tmp_path, on_step=kill_at(5, steps_seen))
    resumed = train_lora(models, images, CONFIG, state_dir=tmp_path, on_step=lambda s, t, l: steps_seen.append(s))
    assert steps_seen == [1, 2, 3, 4, 5, 5, 6]  # saved at 4: step 5 runs again
    assert resumed.resumed_from == 4
    a, b = trained.network.state_dict(), resumed.network.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == trained.losses
    assert any(v.abs().sum() > 0 for k, v in a.items() if "up" in k)  # it trained

    with pytest.raises(ValueError, match="different training"):
        train_lora(models, images, LoraTrainingConfig(**{**CONFIG.__dict__, "lr": 2e-3}), state_dir=tmp_path)
    # Reporting settings may change between runs.
    train_lora(models, images, LoraTrainingConfig(**{**CONFIG.__dict__, "save_every": 3}), state_dir=tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients(models, trained) -> None:
    """The CUDA-only memory saver, checked on the CPU: same loss, same LoRA gradients, and it unwraps cleanly."""
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    trained.network.attach()
    try:
        def grads() -> list[torch.Tensor]:
            trained.network.zero_grad(set_to_none=True)
            models.unet(x, torch.tensor([300.0]), context).square().mean().backward()
            # Text-encoder layers take no part in a U-Net call: no gradient.
            return [p.grad.clone() for p in trained.network.parameters() if p.grad is not None]

        plain = grads()
        blocks = checkpoint_blocks(models.unet)
        checkpointed = grads()
        uncheckpoint_blocks(blocks)
    finally:
        trained.network.detach()
        trained.network.zero_grad(set_to_none=True)
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain, checkpointed))
    assert all("forward" not in vars(b) for b in blocks)


def test_sdxl_refiner_and_inpainting_are_refused() -> None:
    # SDXL base trains (tests/engine/training/test_lora_sdxl_training.py); its refiner does not.
    fam = SimpleNamespace(name="sdxl-refiner", label="SDXL refiner", inpainting=False)
    with pytest.raises(ValueError, match="SDXL refiner is not supported"):
        refuse_unsupported(SimpleNamespace(text_encoder_2=None, family=fam))
    fam = SimpleNamespace(name="sd1-inpaint", label="SD 1.x", inpainting=True)
    with pytest.raises(ValueError, match="inpainting"):
        refuse_unsupported(SimpleNamespace(text_encoder_2=None, family=fam))


def _outputs(models, captions=("zwx bottle on a beach",)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        context = encode_captions(models.text_encoder, models.tokenizer, family_encoding(models), list(captions))
        return context, models.unet(x, torch.tensor([400.0]), context)


def test_exported_file_merges_like_the_trained_layers(models, images, trained, tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = export_lora(tmp_path / "zwx.safetensors", trained, models, images, CONFIG, licence="CreativeML OpenRAIL-M")
    info = describe_lora(path)
    assert (info.format, info.family, info.ranks, info.alphas) == ("kohya LoRA", "sd1", (4,), (2.0,))
    assert info.text_encoder_modules == 12 and info.unet_modules > 0
    meta = open_lora(path).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["adforge.image_set_sha256"] == images.sha256 and meta["adforge.trigger"] == "zwx"
    assert meta["ss_new_sd_model_hash"] == models.checkpoint.sha256
    assert '"zwx bottle": 4' in meta["ss_tag_frequency"]

    base_context, base_out = _outputs(models)
    trained.network.attach()
    try:
        live_context, live_out = _outputs(models)
    finally:
        trained.network.detach()
    merged = load_checkpoint(tiny_checkpoint)
    LoraMerger(merged).activate([LoraUse(AdapterFile(path.stem, str(path)))])
    merged_context, merged_out = _outputs(merged)
    assert (live_out - base_out).abs().max() > 1e-3  # the LoRA does something
    scale = live_out.abs().max()
    assert (merged_out - live_out).abs().max() / scale < 2e-3  # float16 weights in the file
    assert (merged_context - live_context).abs().max() / live_context.abs().max() < 2e-3


def test_sd2_v_trains_and_exports_as_v2(tmp_path: Path, images) -> None:
    m = load_checkpoint(write_random(tmp_path / "sd2v.safetensors", family="sd2-v"))
    assert m.prediction == "v"
    config = LoraTrainingConfig(rank=2, resolution=128, steps=2, save_every=2, seed=0)
    result = train_lora(m, images, config, state_dir=tmp_path / "state")
    meta = open_lora(export_lora(tmp_path / "v.safetensors", result, m, images, config)).metadata
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["ss_v_parameterization"]) == ("True", "sd_v2_v", "True")
    assert describe_lora(tmp_path / "v.safetensors").family == "sd2"


def test_diffusers_loads_the_file_with_the_same_effect(models, images, trained, tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from tests.engine.adapters.test_lora_diffusers_parity import diffusers_pipeline

    path = export_lora(tmp_path / "zwx.safetensors", trained, models, images, CONFIG)
    pipe = diffusers_pipeline(models, path)
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    merged = load_checkpoint(tiny_checkpoint)
    LoraMerger(merged).activate([LoraUse(AdapterFile(path.stem, str(path)))])
    with torch.no_grad():
        ref = pipe.unet(x, torch.tensor([400.0]), encoder_hidden_states=context).sample
        ours = merged.unet(x, torch.tensor([400.0]), context)
        base = models.unet(x, torch.tensor([400.0]), context)
    assert (ours - base).abs().max() > 1e-3
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-3
    # The text-encoder half too: diffusers converts the kohya lora_te_ keys and patches its CLIP the same way.
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():
        ref_text, ours_text = pipe.text_encoder(ids)[0], merged.text_encoder(ids)[0]
        base_text = models.text_encoder(ids)[0]
    assert (ours_text - base_text).abs().max() > 1e-3
    assert (ours_text - ref_text).abs().max() / ref_text.abs().max() < 1e-4

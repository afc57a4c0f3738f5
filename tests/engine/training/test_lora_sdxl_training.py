"""SDXL base LoRA training on the tiny random SDXL model: the trainer conditions the U-Net exactly as the pipeline
does, it learns, it resumes exactly, and its kohya file (lora_unet_ in LDM names, lora_te1_, lora_te2_) loads in our
merger and in diffusers' StableDiffusionXLPipeline with the same effect as the in-memory layers."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.adapters.lora_file import describe_lora, open_lora
from engine.adapters.lora_merge import LoraMerger
from engine.adapters.refs import AdapterFile, LoraUse
from engine.loading import load_checkpoint
from engine.pipeline import GenerationRequest, Pipeline
from engine.random_checkpoint import write_random
from engine.schedule import DiscreteSchedule
from engine.training.buckets import bucket_step, make_buckets
from engine.training.caption_encoding import SDXLConditioning, encode_sdxl_captions, sdxl_y
from engine.training.diffusion_step import bucket_images, training_resolution
from engine.training.lora_export import export_lora
from engine.training.lora_trainer import (
    LoraTrainingConfig, cache_latents, refuse_unsupported, size_conditioning, train_lora,
)
from tests.engine.training.helpers import Killed, kill_at, product_images

RES = 64  # the tiny SDXL U-Net needs multiples of 32; 64 keeps the CPU steps short
CONFIG = LoraTrainingConfig(rank=4, resolution=RES, steps=6, batch_size=2, save_every=2, lr=1e-3, text_lr=1e-3,
                            seed=3, train_text_encoder=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_random(tmp_path_factory.mktemp("xl") / "xl.safetensors", "sdxl", "tiny", seed=2))


@pytest.fixture(scope="module")
def xl(ckpt: Path):
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return product_images(tmp_path_factory.mktemp("product"), [(96, 64), (64, 96), (80, 80), (128, 64)],
                          "zwx bottle, on a table", min_side=64)


@pytest.fixture(scope="module")
def trained(xl, images, tmp_path_factory: pytest.TempPathFactory):
    return train_lora(xl, images, CONFIG, state_dir=tmp_path_factory.mktemp("state"))


def test_conditioning_equals_the_pipelines(xl) -> None:
    captions = ["zwx bottle, (on a table:1.3)", "zwx bottle " + "word " * 90, ""]  # "": a dropped caption
    w, h = 96, 64
    reqs = [GenerationRequest(prompt=c, seed=0, width=w, height=h) for c in captions]
    want_context, want_y = Pipeline(xl)._conditioning(reqs)
    assert want_y is not None
    context, pooled = encode_sdxl_captions(xl.text_encoder, xl.text_encoder_2, xl.tokenizer, captions)
    y = sdxl_y(pooled, torch.tensor([[h, w, 0, 0, h, w]] * len(captions)))
    assert context.shape == (3, 154, 16 + 32) and y.shape == want_y[:3].shape
    # Equal up to float rounding: we run all captions' chunks as one batch, the pipeline one prompt at a time.
    assert (context - want_context[:3]).abs().max() < 1e-5
    assert (y - want_y[:3]).abs().max() < 1e-5
    # The pipeline's uncond for an empty negative prompt is the encoded "" (no zeroing): a dropped caption's too.
    assert (context[2] - want_context[3]).abs().max() < 1e-5 and (y[2] - want_y[3]).abs().max() < 1e-5
    # What train_lora feeds the U-Net: the same, with a training text encoder and with a frozen one (cached per caption).
    ids = torch.tensor([[h, w, 0, 0, h, w]] * len(captions))
    for trains in (True, False):
        cond = SDXLConditioning(xl, clip_skip=1, trains=trains)
        for _ in range(2):  # the second call reads the frozen cache
            c, yy = cond(captions, ids)
            assert (c - want_context[:3]).abs().max() < 1e-5 and (yy - want_y[:3]).abs().max() < 1e-5
        c, yy = cond(captions[:1], ids[:1])  # one chunk alone: no padding
        assert c.shape[1] == 77 and (c[0] - want_context[0, :77]).abs().max() < 1e-5


def test_size_rows_are_sd_scripts(images) -> None:
    assignment = bucket_images(images, 128, 32, 2.0)  # buckets 160x96, 128x128, 96x160
    rows = size_conditioning(images, assignment)
    # (original h, w, crop top, left, target h, w): 96x64 covers the 160x96 bucket at 160x107, cropped 5 px from the top.
    assert rows[0] == (64, 96, 5, 0, 96, 160)
    assert rows[1] == (96, 64, 0, 5, 160, 96)
    assert rows[2] == (80, 80, 0, 0, 128, 128)
    assert rows[3] == (64, 128, 0, 16, 96, 160)  # 2:1 covers 160x96 at 192x96: 16 px off the left


def test_real_sdxl_buckets_at_1024_class_sizes() -> None:
    real = SimpleNamespace(native_size=1024, vae=SimpleNamespace(config=SimpleNamespace(downscale_factor=8)),
                           unet=SimpleNamespace(config=SimpleNamespace(downsample_factor=4)))
    resolution, align = training_resolution(real, None)
    assert (resolution, bucket_step(resolution, align)) == (1024, 64)
    buckets = make_buckets(resolution, 64)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768)} <= set(buckets)


def test_refiner_and_inpainting_are_refused() -> None:
    refiner = SimpleNamespace(name="sdxl-refiner", label="SDXL refiner", inpainting=False)
    with pytest.raises(ValueError, match="refiner is not supported"):
        refuse_unsupported(SimpleNamespace(text_encoder_2=None, family=refiner))
    inpaint = SimpleNamespace(name="sdxl-inpaint", label="SDXL", inpainting=True)
    with pytest.raises(ValueError, match="inpainting"):
        refuse_unsupported(SimpleNamespace(text_encoder_2=object(), family=inpaint))
    refuse_unsupported(SimpleNamespace(text_encoder_2=object(), family=SimpleNamespace(
        name="sdxl", label="SDXL", inpainting=False)))  # the base trains


def test_training_lowers_the_loss_on_fixed_noise(xl, images, tmp_path: Path) -> None:
    assignment = bucket_images(images, RES, 32, 2.0)
    latents = cache_latents(xl, images, assignment)
    rows = size_conditioning(images, assignment)
    ac = DiscreteSchedule.sd1().alphas_cumprod.float()
    g = torch.Generator().manual_seed(99)
    cases = [(latents[i], images.items[i].caption, rows[i], t, torch.randn(latents[i].shape, generator=g))
             for i in latents for t in (50, 250, 450, 650, 850)]

    @torch.no_grad()
    def loss() -> float:
        total = 0.0
        for x0, caption, row, t, noise in cases:
            a = ac[t]
            context, pooled = encode_sdxl_captions(xl.text_encoder, xl.text_encoder_2, xl.tokenizer, [caption])
            x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise)[None]
            pred = xl.unet(x_t, torch.tensor([float(t)]), context, sdxl_y(pooled, torch.tensor([row])))
            total += torch.nn.functional.mse_loss(pred[0], noise).item()
        return total / len(cases)

    base = loss()
    # The SDXL default: U-Net only (train_text_encoder None), as sd-scripts users mostly train SDXL.
    result = train_lora(xl, images, LoraTrainingConfig(rank=4, resolution=RES, steps=30, lr=3e-3, seed=1),
                        state_dir=tmp_path / "state")
    assert not result.text_encoder and all(t.part == "unet" for t in result.network.targets)
    result.network.attach()
    try:
        after = loss()
    finally:
        result.network.detach()
    assert loss() == base  # detached: the base model is untouched
    print(f"fixed-noise loss {base:.4f} -> {after:.4f}")
    assert after < 0.97 * base, (base, after)


def test_killed_run_resumes_to_identical_weights(xl, images, trained, tmp_path: Path) -> None:
    steps_seen: list[int] = []
    with pytest.raises(Killed):
        train_lora(xl, images, CONFIG, state_dir=tmp_path, on_step=kill_at(5, steps_seen))
    resumed = train_lora(xl, images, CONFIG, state_dir=tmp_path, on_step=lambda s, t, l: steps_seen.append(s))
    assert steps_seen == [1, 2, 3, 4, 5, 5, 6] and resumed.resumed_from == 4
    a, b = trained.network.state_dict(), resumed.network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == trained.losses
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):  # every part trained
        assert any(v.abs().sum() > 0 for k, v in a.items() if k.startswith("layers." + prefix) and ".up." in k), prefix


def _outputs(models, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context, y, U-Net output) for one caption, through both encoders and the U-Net."""
    with torch.no_grad():
        context, pooled = encode_sdxl_captions(models.text_encoder, models.text_encoder_2, models.tokenizer,
                                               ["zwx bottle on a beach"])
        y = sdxl_y(pooled, torch.tensor([[64, 64, 0, 0, 64, 64]]))
        return context, y, models.unet(x, torch.tensor([400.0]), context, y)


def test_exported_file_merges_like_the_trained_layers(xl, images, trained, ckpt: Path, tmp_path: Path) -> None:
    path = export_lora(tmp_path / "zwx.safetensors", trained, xl, images, CONFIG, licence="CreativeML OpenRAIL++-M")
    info = describe_lora(path)
    assert (info.format, info.family, info.ranks) == ("kohya LoRA", "sdxl", (4,))
    meta = open_lora(path).metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_v2"] == "False" and meta["ss_network_train_unet_only"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    stems = {k.split(".")[0] for k in trained.network.kohya_state_dict()}
    assert any(s.startswith("lora_unet_input_blocks_") for s in stems)  # LDM names, as SDXL kohya files
    assert any(s.startswith("lora_te1_text_model_encoder_layers_") for s in stems)
    assert any(s.startswith("lora_te2_text_model_encoder_layers_") for s in stems)

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    base_context, base_y, base_out = _outputs(xl, x)
    trained.network.attach()
    try:
        live_context, live_y, live_out = _outputs(xl, x)
    finally:
        trained.network.detach()
    merged = load_checkpoint(ckpt)
    LoraMerger(merged).activate([LoraUse(AdapterFile(path.stem, str(path)))])
    merged_context, merged_y, merged_out = _outputs(merged, x)
    assert (live_out - base_out).abs().max() > 1e-3  # the LoRA does something
    for half in (slice(0, 16), slice(16, 48)):  # CLIP-L's and bigG's features: both encoders changed
        assert (live_context[..., half] - base_context[..., half]).abs().max() > 1e-4
    assert (live_y - base_y).abs().max() > 1e-5  # the pooled bigG output too
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    # float16 weights in the file
    assert rel(merged_out, live_out) < 2e-3 and rel(merged_context, live_context) < 2e-3 and rel(merged_y, live_y) < 2e-3


def test_diffusers_loads_the_file_with_the_same_effect(xl, images, trained, ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from engine.checkpoint import UNET_PREFIX
    from engine.unet import sdxl_size_embedding
    from tests.engine.test_unet_parity import diffusers_config

    path = export_lora(tmp_path / "zwx.safetensors", trained, xl, images, CONFIG)
    cfg = diffusers_config(xl.unet.config, size_dim=256)
    unet = diffusers.UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in xl.unet.state_dict().items()}, cfg))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=copy.deepcopy(xl.text_encoder), text_encoder_2=copy.deepcopy(xl.text_encoder_2),
        tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None, add_watermarker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    merged = load_checkpoint(ckpt)
    LoraMerger(merged).activate([LoraUse(AdapterFile(path.stem, str(path)))])

    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 48, generator=g)
    pooled, time_ids = torch.randn(1, 24, generator=g), torch.tensor([[64.0, 96, 5, 0, 32, 64]])
    y = torch.cat([pooled, sdxl_size_embedding(time_ids)], dim=-1)
    with torch.no_grad():
        ref = pipe.unet(x, torch.tensor([400.0]), encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        ours, base = merged.unet(x, torch.tensor([400.0]), context, y), xl.unet(x, torch.tensor([400.0]), context, y)
    assert (ours - base).abs().max() > 1e-3
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-3
    # Both text encoders: diffusers converts lora_te1_ / lora_te2_ and patches its CLIP-L and bigG the same way.
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    for mine, theirs, before in ((merged.text_encoder, pipe.text_encoder, xl.text_encoder),
                                 (merged.text_encoder_2, pipe.text_encoder_2, xl.text_encoder_2)):
        with torch.no_grad():
            a = mine(ids, output_hidden_states=True).hidden_states[-2]
            b = theirs(ids, output_hidden_states=True).hidden_states[-2]
            c = before(ids, output_hidden_states=True).hidden_states[-2]
        assert (a - c).abs().max() > 1e-4
        assert (a - b).abs().max() / b.abs().max() < 1e-3


def test_a_float16_vae_overflow_is_redone_in_float32(images) -> None:
    """The SDXL VAE overflows in float16: the latent cache must not hand NaNs to training."""
    class Vae:  # stands in for a float16 SDXL VAE that overflows
        dtype = torch.float16

        def encode_latents(self, px: torch.Tensor) -> torch.Tensor:
            fill = float("nan") if self.dtype == torch.float16 else 0.5
            return torch.full((px.shape[0], 4, px.shape[2] // 8, px.shape[3] // 8), fill)

        def float(self) -> "Vae":
            self.dtype = torch.float32
            return self

    models = SimpleNamespace(vae=Vae(), device=torch.device("cpu"))
    latents = cache_latents(models, images, bucket_images(images, RES, 32, 2.0))
    assert models.vae.dtype == torch.float32 and all(torch.isfinite(v).all() for v in latents.values())

"""DreamBooth on the tiny random models: class images are rendered once, training learns, prior preservation is
measured, a killed run resumes exactly, and the exported single file loads in our engine (and its U-Net in
diffusers' converter) as the trained model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint import UNET_PREFIX
from engine.loading import load_checkpoint
from engine.pipeline import Pipeline
from engine.random_checkpoint import write_random
from engine.requests import GenerationRequest
from engine.schedule import DiscreteSchedule
from engine.training.caption_encoding import encode_captions, family_encoding
from engine.training.class_images import MANIFEST, ClassImagesMismatch, render_class_images
from engine.training.dreambooth_trainer import (
    DreamBoothConfig, export_dreambooth, refuse_unsupported, train_dreambooth,
)
from engine.training.lora_trainer import cache_latents
from tests.engine.training.helpers import Killed, kill_at, product_images

LICENCE = "CreativeML OpenRAIL-M"
CONFIG = DreamBoothConfig(resolution=64, steps=4, batch_size=1, num_class_images=2, class_steps=2, save_every=2,
                          lr=1e-3, seed=3)
PRE_STEPS = 120  # fitting the tiny base to its class images (prior preservation test)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny-sd1.safetensors"
    return Path(write_random(path, "sd1", "tiny", metadata={"modelspec.license": LICENCE}))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    # The 96x64 one lands in a non-square bucket.
    return product_images(tmp_path_factory.mktemp("product"), [(64, 64), (96, 64), (72, 72)], min_side=64)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("class")


@pytest.fixture(scope="module")
def trained(base, images, class_dir, tmp_path_factory: pytest.TempPathFactory):
    models = load_checkpoint(base)
    return models, train_dreambooth(models, images, CONFIG, class_dir=class_dir,
                                    state_dir=tmp_path_factory.mktemp("state"))


def _fixed_cases(latents: list[torch.Tensor], seed: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(x0, t, torch.randn(x0.shape, generator=g)) for x0 in latents for t in (100, 400, 700, 900)]


@torch.no_grad()
def _predictions(models, cases, prompt: str) -> torch.Tensor:
    ac = DiscreteSchedule.sd1().alphas_cumprod.float()
    context = encode_captions(models.text_encoder, models.tokenizer, family_encoding(models), [prompt])
    return torch.cat([models.unet((ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * n)[None], torch.tensor([float(t)]), context)
                      for x0, t, n in cases])


def test_class_images_are_rendered_once_and_reused(base, tmp_path: Path) -> None:
    pipe = Pipeline(load_checkpoint(base))
    first = render_class_images(pipe, "a photo of bottle", 2, tmp_path, size=64, steps=2, seed=5)
    assert (first.rendered, first.reused, first.seeds) == (2, 0, [5, 6])
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.paths}
    again = render_class_images(pipe, "a photo of bottle", 2, tmp_path, size=64, steps=2, seed=5)
    assert (again.rendered, again.reused, again.paths) == (0, 2, first.paths)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in again.paths} == stamps  # not rewritten
    more = render_class_images(pipe, "a photo of bottle", 3, tmp_path, size=64, steps=2, seed=5)
    assert (more.rendered, more.reused) == (1, 2)
    # A damaged image is rendered again, from its own seed: the same bytes come back.
    first.paths[1].write_bytes(b"truncated")
    healed = render_class_images(pipe, "a photo of bottle", 3, tmp_path, size=64, steps=2, seed=5)
    assert healed.rendered == 1 and first.paths[1].read_bytes() == stamps[first.paths[1]][1]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["model_sha256"] == pipe.models.checkpoint.sha256 and len(manifest["images"]) == 3
    with pytest.raises(ClassImagesMismatch, match="prompt"):
        render_class_images(pipe, "a photo of a jar", 3, tmp_path, size=64, steps=2, seed=5)
    other = SimpleNamespace(models=SimpleNamespace(checkpoint=SimpleNamespace(sha256="0" * 64)))
    with pytest.raises(ClassImagesMismatch, match="model_sha256"):
        render_class_images(other, "a photo of bottle", 3, tmp_path, size=64, steps=2, seed=5)


def test_training_lowers_the_instance_loss_on_fixed_noise(base, images, class_dir, tmp_path: Path) -> None:
    models = load_checkpoint(base)
    latents = list(cache_latents(models, images, {(64, 64): [0, 2]}).values())
    cases = _fixed_cases(latents, 99)
    targets = torch.stack([n for _, _, n in cases])

    def loss() -> float:
        return torch.nn.functional.mse_loss(_predictions(models, cases, "zwx bottle"), targets).item()

    before = loss()
    result = train_dreambooth(models, images, replace(CONFIG, steps=8), class_dir=class_dir, state_dir=tmp_path)
    after = loss()
    print(f"fixed-noise instance loss {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before, (before, after)
    assert len(result.prior_losses) == len(result.instance_losses) == 8
    assert all(abs(t - (i + p)) < 1e-5 for t, i, p in zip(result.losses, result.instance_losses, result.prior_losses))


def test_prior_preservation_keeps_the_class_prompt_near_the_base(base, images, class_dir, trained,
                                                               tmp_path: Path) -> None:
    """Same steps and seed with prior_loss_weight 1 and 0: with the prior, the class prompt's prediction on the class
    images (fixed timesteps and noise) drifts less from the base's.

    Prior preservation anchors the model to the base's own renders, which only holds a base still if the base
    already denoises them well, as a real model does its own samples. A random tiny base does not (its loss on them
    is ~1.3, so the prior term itself would move it), so the base here is first fitted to the class images
    (in memory: the manifest's model and the file stay the same)."""
    _, reference = trained
    prior = class_images_of(base, reference.class_prompt, class_dir)
    fitted = load_checkpoint(base)
    train_dreambooth(fitted, prior, replace(CONFIG, steps=PRE_STEPS, batch_size=2, prior_loss_weight=0.0),
                     class_dir=tmp_path / "unused", state_dir=tmp_path / "fit")
    cases = _fixed_cases(list(cache_latents(fitted, prior, {(64, 64): [0, 1]}).values()), 7)
    at_base = _predictions(fitted, cases, reference.class_prompt)
    drift = {}
    for weight in (0.0, 1.0):
        models = load_checkpoint(base)
        models.unet.load_state_dict(fitted.unet.state_dict())
        train_dreambooth(models, images, replace(CONFIG, steps=8, prior_loss_weight=weight), class_dir=class_dir,
                         state_dir=tmp_path / str(weight))
        drift[weight] = (_predictions(models, cases, reference.class_prompt) - at_base).square().mean().item()
    print(f"class-prompt drift from the base: no prior {drift[0.0]:.5f}, prior {drift[1.0]:.5f}")
    assert drift[1.0] < 0.8 * drift[0.0], drift


def class_images_of(base: Path, prompt: str, class_dir: Path):
    """The fixture's class images (already rendered: reused) as an image set captioned with the class prompt."""
    rendered = render_class_images(Pipeline(load_checkpoint(base)), prompt, CONFIG.num_class_images, class_dir,
                                   size=64, steps=CONFIG.class_steps, seed=CONFIG.seed)
    assert rendered.rendered == 0
    return rendered.image_set(size=64, trigger="bottle", class_word="bottle")


def test_killed_run_resumes_to_identical_weights(base, images, class_dir, trained, tmp_path: Path) -> None:
    reference_models, reference = trained
    models = load_checkpoint(base)
    seen: list[int] = []
    with pytest.raises(Killed):
        train_dreambooth(models, images, CONFIG, class_dir=class_dir, state_dir=tmp_path, on_step=kill_at(3, seen))
    resumed = train_dreambooth(models, images, CONFIG, class_dir=class_dir, state_dir=tmp_path,
                               on_step=lambda s, t, l: seen.append(s))
    assert seen == [1, 2, 3, 3, 4]  # saved at 2: step 3 runs again
    assert resumed.resumed_from == 2 and resumed.losses == reference.losses
    a, b = reference_models.unet.state_dict(), models.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different training"):
        train_dreambooth(models, images, replace(CONFIG, lr=2e-3), class_dir=class_dir, state_dir=tmp_path)
    # Changed weights and nothing to resume from: the run would not start from the base.
    with pytest.raises(ValueError, match="load the base model again"):
        train_dreambooth(models, images, CONFIG, class_dir=class_dir, state_dir=tmp_path / "new")


def test_export_loads_as_the_trained_model_and_renders(base, trained, tmp_path: Path) -> None:
    models, result = trained
    base_models = load_checkpoint(base)
    path = export_dreambooth(tmp_path / "zwx.safetensors", result, models, metadata={"modelspec.title": "Zwx"})
    loaded = load_checkpoint(path)
    assert loaded.family.name == base_models.family.name == "sd1" and loaded.prediction == "eps"
    assert loaded.native_size == base_models.native_size
    trained_sd, loaded_sd = models.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(loaded_sd[k], trained_sd[k].half().float()) for k in trained_sd)  # fp16 rounding only
    assert any(not torch.equal(v, base_models.unet.state_dict()[k]) for k, v in trained_sd.items())
    for part in ("vae", "text_encoder"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(base_models, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k].half().float()) for k in theirs if theirs[k].is_floating_point())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor(UNET_PREFIX + "out.2.weight").dtype == torch.float16
    assert meta["adforge.base_sha256"] == base_models.checkpoint.sha256
    assert (meta["adforge.trigger"], meta["adforge.class_word"]) == ("zwx", "bottle")
    assert meta["adforge.licence"] == meta["modelspec.license"] == LICENCE
    assert meta["modelspec.title"] == "Zwx"
    assert json.loads(meta["adforge.training_settings"])["prior_loss_weight"] == 1.0
    image = Pipeline(loaded).generate([GenerationRequest("zwx bottle", seed=1, width=64, height=64, steps=2)])[0].image
    assert image.size == (64, 64)
    # float32: the file holds the trained U-Net bit for bit.
    exact = load_checkpoint(export_dreambooth(tmp_path / "f32.safetensors", result, models, dtype=torch.float32))
    assert all(torch.equal(exact.unet.state_dict()[k], v) for k, v in trained_sd.items())


def test_diffusers_converter_reads_the_same_unet(trained, tmp_path: Path) -> None:
    """diffusers' ``from_single_file`` needs the hub's configs (model_index, the CLIP tokenizer), not available
    offline and not matching the tiny shapes; its single-file converter is what reads the layout, so it is used
    directly on the exported file's U-Net keys."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.engine.test_unet_parity import diffusers_config

    models, result = trained
    path = export_dreambooth(tmp_path / "zwx.safetensors", result, models, dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        file_sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    cfg = diffusers_config(models.unet.config)
    unet = diffusers.UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(file_sd, cfg))
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        ref = unet(x, torch.tensor([400.0]), encoder_hidden_states=context).sample
        ours = models.unet(x, torch.tensor([400.0]), context)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_sd2_v_trains_and_exports_in_its_layout(images, tmp_path: Path) -> None:
    models = load_checkpoint(write_random(tmp_path / "sd2v.safetensors", family="sd2-v"))
    config = replace(CONFIG, steps=2, prior_loss_weight=0.0)  # plain fine-tune: no class images rendered
    result = train_dreambooth(models, images, config, class_dir=tmp_path / "class", state_dir=tmp_path / "state")
    assert result.prior_losses == [] and result.class_images == []
    loaded = load_checkpoint(export_dreambooth(tmp_path / "out.safetensors", result, models))
    assert (loaded.family.name, loaded.prediction) == ("sd2", "v")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert "cond_stage_model.model.text_projection" in f.keys()


def test_sdxl_inpainting_and_half_precision_are_refused() -> None:
    sdxl = SimpleNamespace(text_encoder_2=object(), family=SimpleNamespace(name="sdxl", label="SDXL", inpainting=False),
                           dtype=torch.float32)
    with pytest.raises(ValueError, match="SDXL is not supported yet"):
        refuse_unsupported(sdxl)
    inpaint = SimpleNamespace(text_encoder_2=None, family=SimpleNamespace(name="sd1", label="SD 1.x", inpainting=True),
                              dtype=torch.float32)
    with pytest.raises(ValueError, match="inpainting"):
        refuse_unsupported(inpaint)
    half = SimpleNamespace(text_encoder_2=None, family=SimpleNamespace(name="sd1", label="SD 1.x", inpainting=False),
                           dtype=torch.float16)
    with pytest.raises(ValueError, match="float32"):
        refuse_unsupported(half)


def test_ema_weights_are_what_is_exported(base, images, tmp_path: Path) -> None:
    models = load_checkpoint(base)
    config = replace(CONFIG, steps=2, prior_loss_weight=0.0, use_ema=True, ema_decay=0.5)
    result = train_dreambooth(models, images, config, class_dir=tmp_path / "class", state_dir=tmp_path / "state")
    live = models.unet.state_dict()
    assert result.ema is not None and any(not torch.equal(result.ema[k], live[k]) for k in live)
    exported = load_checkpoint(export_dreambooth(tmp_path / "ema.safetensors", result, models, dtype=torch.float32))
    assert all(torch.equal(exported.unet.state_dict()[k], result.ema[k]) for k in live)

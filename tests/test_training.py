"""The training code: a few steps lower the loss, and a killed training run resumes to the same result."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from engine.demo.recipe import _image_tensor
from engine.demo.scenes import caption, random_scene
from engine.random_checkpoint import TINY_TEXT, TINY_UNET, TINY_VAE
from engine.text_encoder import build_text_encoder
from engine.tokenizer import load_clip_tokenizer
from engine.training.diffusion_trainer import DiffusionTrainingConfig, train_text_to_image
from engine.training.vae_trainer import calibrate_latent_scale, train_vae
from engine.unet import UNetModel
from engine.vae import AutoencoderKL

SIZE = 32


def _scenes(seed: int, n: int):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


def test_vae_training_lowers_the_loss_and_calibration_keeps_reconstructions() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE)
    images = _image_tensor(_scenes(0, 8), SIZE)

    def batches():
        while True:
            yield images

    losses = train_vae(vae, batches(), 40, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    with torch.no_grad():
        before = vae.decode(vae.encode(images * 2 - 1)[0])
        k = calibrate_latent_scale(vae, images)
        mean, _ = vae.encode(images * 2 - 1)
        after = vae.decode(mean)
    assert k > 0
    assert (mean * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-3)
    assert torch.allclose(before, after, atol=1e-4)  # rescaling the latent space changes no pixel


def _diffusion_setup(seed: int = 0):
    torch.manual_seed(seed)
    unet, text = UNetModel(TINY_UNET), build_text_encoder(TINY_TEXT)
    scenes = _scenes(1, 16)
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(16, 4, 4, 4, generator=gen)  # stands in for encoded images: the U-Net trains on latents

    def sample_batch(n: int, g: torch.Generator):
        idx = torch.randint(0, len(scenes), (n,), generator=g)
        wording = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
        return latents[idx], [caption(scenes[i], wording) for i in idx.tolist()]

    return unet, text, sample_batch


def test_diffusion_training_lowers_the_loss() -> None:
    unet, text, sample_batch = _diffusion_setup()
    config = DiffusionTrainingConfig(steps=60, batch_size=16, lr=2e-3, warmup=5, caption_dropout=0.1)
    seen: list[tuple[int, object]] = []
    ema, losses, seconds = train_text_to_image(
        unet, text, load_clip_tokenizer(), sample_batch, config, save_every=25, on_checkpoint=lambda step, m: seen.append((step, m))
    )
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    # The progress hook sees the EMA model every save_every steps (no state file needed).
    assert [step for step, _ in seen] == [25, 50] and all(m is ema for _, m in seen)
    # The EMA copy is what gets saved: it differs from the live weights but tracks them.
    live = dict(unet.named_parameters())
    assert any(not torch.equal(p, live[n]) for n, p in ema.unet.named_parameters())


def test_killed_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    config = DiffusionTrainingConfig(steps=6, batch_size=4, lr=1e-3, warmup=1)
    unet, text, sample_batch = _diffusion_setup()
    straight, _, _ = train_text_to_image(unet, text, load_clip_tokenizer(), sample_batch, config)

    state = tmp_path / "state.pt"
    unet, text, sample_batch = _diffusion_setup()
    partial = DiffusionTrainingConfig(**config.__dict__)
    calls = {"n": 0}

    def dying_batch(n, g):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt  # the process dies during step 5
        return sample_batch(n, g)

    with pytest.raises(KeyboardInterrupt):
        train_text_to_image(unet, text, load_clip_tokenizer(), dying_batch, partial, state_file=state, save_every=2)
    before = torch.load(state, weights_only=True)["seconds"]
    assert before > 0
    unet, text, sample_batch = _diffusion_setup(seed=99)  # fresh (different) init: everything must come from the state
    resumed, _, resumed_seconds = train_text_to_image(unet, text, load_clip_tokenizer(), sample_batch, partial, state_file=state, save_every=2)
    # The time reported covers the killed run too, not only the resumed part.
    assert resumed_seconds > before
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_demo_cli_writes_a_loadable_sd1_checkpoint_and_resumes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from engine.checkpoint import detect_family, open_state_dict
    from engine.models import load_sd1
    from flows.cli import app

    out, work = tmp_path / "demo.safetensors", tmp_path / "work"
    args = ["train", "demo", "--out", str(out), "--work-dir", str(work), "--scale", "0.0005", "--threads", "1"]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sd = open_state_dict(out)
    assert detect_family(sd).name == "sd1" and sd.metadata["adforge.native_size"] == "128"
    models = load_sd1(out)
    assert models.native_size == 128 and models.unet.config.model_channels == 64
    from engine.demo.recipe import DemoRecipe

    # One resumable state per diffusion stage: the first from scratch, each continuation from the one before.
    stages = 1 + len(DemoRecipe().continuations)
    assert stages >= 2 and "diffusion stage 2:" in res.output
    assert (work / "vae.pt").exists() and len(list(work.glob("diffusion-state-*.pt"))) == stages
    assert len(json.loads(sd.metadata["adforge.training"])["continuations"]) == stages - 1
    # Started again on the same work folder: every stage is reused, nothing is retrained.
    again = CliRunner().invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0 and "reusing the trained VAE" in again.output and "resumed diffusion training" in again.output

"""The training code: a few steps lower the loss, and a killed training run resumes to the same result."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from demo.dataset import image_tensor
from demo.scenes import caption, random_scene
from engine.random_checkpoint import TINY_TEXT, TINY_UNET, TINY_VAE
from engine.text_encoder import build_text_encoder
from engine.tokenizer import load_clip_tokenizer
from engine.training.diffusion_trainer import DiffusionTrainingConfig, train_text_to_image
from engine.training.vae_trainer import calibrate_latent_scale, train_vae
from engine.unet import UNetModel
from engine.vae import AutoencoderKL

SIZE = 32


def _random_scenes(seed: int, n: int):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


def test_vae_training_lowers_the_loss_and_calibration_keeps_reconstructions() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE)
    images = image_tensor(_random_scenes(0, 8), SIZE)

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
    scenes = _random_scenes(1, 16)
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


def test_text_attribute_heads_teach_the_encoder_the_background_colour() -> None:
    """The training-only heads read the states after EOS; a few steps make them name each caption's background,
    and the text encoder (not only the head) is what changed."""
    from demo.scenes import ATTRIBUTE_CLASSES, attribute_targets
    from engine.training.diffusion_trainer import TextToImageModel, padding_state_mean, text_aux_loss, tokenize_captions

    unet, text, _ = _diffusion_setup()
    scenes = _random_scenes(3, 32)
    latents = torch.randn(len(scenes), 4, 4, 4, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in text.state_dict().items()}

    def sample_batch(n: int, g: torch.Generator):
        idx = torch.randint(0, len(scenes), (n,), generator=g)
        wording = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
        return latents[idx], [caption(scenes[i], wording) for i in idx.tolist()], torch.tensor([attribute_targets(scenes[i]) for i in idx.tolist()])

    config = DiffusionTrainingConfig(steps=80, batch_size=16, lr=3e-3, warmup=5, caption_dropout=0.1, text_aux_weight=1.0,
                                     mean_weight=0.1, high_noise_share=0.5)
    ema, losses, _ = train_text_to_image(unet, text, load_clip_tokenizer(), sample_batch, config, aux_classes=ATTRIBUTE_CLASSES)
    assert len(ema.aux) == len(ATTRIBUTE_CLASSES)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    wording = random.Random(9)
    captions = [caption(s, wording) for s in scenes]
    ids = tokenize_captions(captions, load_clip_tokenizer())
    targets = torch.tensor([attribute_targets(s) for s in scenes])
    with torch.no_grad():
        context = ema.text_encoder(input_ids=ids).last_hidden_state
        right = (ema.aux[0](padding_state_mean(context, ids)).argmax(1) == targets[:, 0]).float().mean().item()
        assert right > 0.3  # 10 colours: chance is 0.1 (the EMA weights lag the live ones after 80 steps)
        untrained = TextToImageModel(unet, text, ATTRIBUTE_CLASSES)
        assert text_aux_loss(ema, context, ids, targets) < text_aux_loss(untrained, context, ids, targets)
        # A caption that states nothing (all -100) adds nothing.
        assert text_aux_loss(ema, context, ids, torch.full_like(targets, -100)).item() == 0.0
    assert any(not torch.equal(before[k], v) for k, v in ema.text_encoder.state_dict().items())


def test_attribute_heads_a_caption_edition_does_not_train_change_nothing() -> None:
    """Stages trained with caption edition 1 (the shipped model's stages 1-3) train exactly as before the heads for
    position, size and gradient direction existed: heads without targets take no part in the loss or the update."""
    from demo.scenes import ATTRIBUTE_CLASSES, attribute_targets

    scenes = _random_scenes(3, 16)
    latents = torch.randn(len(scenes), 4, 4, 4, generator=torch.Generator().manual_seed(1))
    config = DiffusionTrainingConfig(steps=8, batch_size=8, lr=3e-3, warmup=2, text_aux_weight=1.0)

    def run(n_heads: int):
        unet, text, _ = _diffusion_setup()

        def sample_batch(n: int, g: torch.Generator):
            idx = torch.randint(0, len(scenes), (n,), generator=g)
            wording = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
            targets = [attribute_targets(scenes[i], None, edition=1)[:n_heads] for i in idx.tolist()]
            return latents[idx], [caption(scenes[i], wording, state_direction=False) for i in idx.tolist()], torch.tensor(targets)

        ema, _, _ = train_text_to_image(unet, text, load_clip_tokenizer(), sample_batch, config, aux_classes=ATTRIBUTE_CLASSES[:n_heads])
        return {**ema.unet.state_dict(), **{f"text.{k}": v for k, v in ema.text_encoder.state_dict().items()}}

    four, all_heads = run(4), run(len(ATTRIBUTE_CLASSES))
    assert all(torch.equal(four[k], all_heads[k]) for k in four)


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

    from engine.checkpoint import open_state_dict
    from engine.families import detect_family
    from engine.loading import load_checkpoint
    from cli.app import app

    out, work = tmp_path / "demo.safetensors", tmp_path / "work"
    args = ["train", "demo", "--out", str(out), "--work-dir", str(work), "--scale", "0.0005", "--threads", "1"]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sd = open_state_dict(out)
    assert detect_family(sd).name == "sd1" and sd.metadata["adforge.native_size"] == "128"
    models = load_checkpoint(out)
    assert models.native_size == 128 and models.unet.config.model_channels == 64
    from demo.recipe import DemoRecipe

    # One resumable state per diffusion stage: the first from scratch, each continuation from the one before.
    stages = 1 + len(DemoRecipe().continuations)
    assert stages >= 2 and "diffusion stage 2:" in res.output
    assert (work / "vae.pt").exists() and len(list(work.glob("diffusion-state-*.pt"))) == stages
    assert len(json.loads(sd.metadata["adforge.training"])["continuations"]) == stages - 1
    # Started again on the same work folder: every stage is reused, nothing is retrained.
    again = CliRunner().invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0 and "reusing the trained VAE" in again.output and "resumed diffusion training" in again.output


def test_train_demo_continues_from_a_saved_checkpoint_exactly_as_the_whole_chain(tmp_path: Path) -> None:
    """A new stage started from a file (the shipped model, say) gives the file the full chain gives, and a file
    made by another recipe is refused with what differs."""
    from dataclasses import replace

    from engine.checkpoint import open_state_dict
    from demo.recipe import DemoRecipe
    from demo.train import train_demo

    two = DemoRecipe().scaled(0.0005)
    small = lambda stage: replace(stage, batch_size=2)  # noqa: E731
    two = replace(two, diffusion=small(two.diffusion), continuations=(small(two.continuations[0]),))
    three = replace(two, continuations=two.continuations + (replace(two.continuations[0], seed=7),))
    quiet = lambda _: None  # noqa: E731
    work = tmp_path / "work"
    train_demo(three, tmp_path / "full.safetensors", work_dir=work, log=quiet, threads=1)
    # The two-stage recipe's stages are all cached in the same work folder: nothing is trained again.
    train_demo(two, tmp_path / "two.safetensors", work_dir=work, log=quiet, threads=1)
    # A fresh work folder holding only the (keyed) VAE and encoded data: no diffusion stage is cached there.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("vae.pt", "latents.pt"):
        shutil.copy(work / name, fresh / name)
    report = train_demo(three, tmp_path / "cont.safetensors", work_dir=fresh, log=quiet, threads=1,
                        start_from=tmp_path / "two.safetensors")
    assert report["started_from"] == {"file": "two.safetensors", "stages": 2}
    assert len(report["continuations"]) == 2 and report["total_seconds"] > 0
    full, cont = open_state_dict(tmp_path / "full.safetensors"), open_state_dict(tmp_path / "cont.safetensors")
    assert sorted(full) == sorted(cont)
    assert all(torch.equal(full[k], cont[k]) for k in full)
    assert not torch.equal(open_state_dict(tmp_path / "two.safetensors")["model.diffusion_model.out.2.weight"],
                           cont["model.diffusion_model.out.2.weight"])  # stage 3 did train

    # A file made before the recipe tuned its decoder (the shipped file of an earlier recipe, say): the decoder
    # tune runs too, and the result is still the whole chain's, bit for bit.
    assert three.decoder_steps > 0
    untuned = replace(two, decoder_steps=0)
    train_demo(untuned, tmp_path / "untuned.safetensors", work_dir=work, log=quiet, threads=1)
    dec_key = "first_stage_model.decoder.mid.block_1.conv2.weight"
    assert not open_state_dict(tmp_path / "untuned.safetensors")[dec_key].any()  # the analytic start: zero
    fresh2 = tmp_path / "fresh2"
    fresh2.mkdir()
    for name in ("vae.pt", "latents.pt"):
        shutil.copy(work / name, fresh2 / name)
    lines: list[str] = []
    train_demo(three, tmp_path / "cont2.safetensors", work_dir=fresh2, log=lines.append, threads=1,
               start_from=tmp_path / "untuned.safetensors")
    assert any(line.startswith("decoder-only tune") for line in lines)
    cont2 = open_state_dict(tmp_path / "cont2.safetensors")
    assert all(torch.equal(full[k], cont2[k]) for k in full)

    # A file made before the recipe had its focused decoder tune: only that tune runs, from the file's decoder,
    # and the result is again the whole chain's.
    assert three.decoder_focus_steps > 0
    train_demo(replace(two, decoder_focus_steps=0), tmp_path / "unfocused.safetensors", work_dir=work, log=quiet, threads=1)
    assert not torch.equal(open_state_dict(tmp_path / "unfocused.safetensors")[dec_key], full[dec_key])
    fresh4 = tmp_path / "fresh4"
    fresh4.mkdir()
    for name in ("vae.pt", "latents.pt"):
        shutil.copy(work / name, fresh4 / name)
    lines = []
    report = train_demo(three, tmp_path / "cont3.safetensors", work_dir=fresh4, log=lines.append, threads=1,
                        start_from=tmp_path / "unfocused.safetensors")
    assert [line.split(":")[0] for line in lines if line.startswith("decoder-only tune")] == [
        "decoder-only tune focused on small objects (80% of samples)"]
    assert report["decoder_focus"]["seconds"] > 0
    cont3 = open_state_dict(tmp_path / "cont3.safetensors")
    assert all(torch.equal(full[k], cont3[k]) for k in full)

    with pytest.raises(ValueError, match="differs in diffusion"):
        train_demo(replace(three, diffusion=replace(three.diffusion, lr=1e-3)), tmp_path / "x.safetensors", log=quiet,
                   threads=1, start_from=tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="stage 3 was trained with other settings.*no such stage"):
        train_demo(two, tmp_path / "x.safetensors", log=quiet, threads=1, start_from=tmp_path / "full.safetensors")
    assert not (tmp_path / "x.safetensors").exists()

    # A file of the same recipe whose VAE encoder is not the one the recipe builds: refused, naming the file and the
    # tensor, before any training (no decoder tune runs, nothing is written).
    from safetensors.torch import save_file

    tensors = {k: v.clone() for k, v in open_state_dict(tmp_path / "untuned.safetensors").items()}
    key = "first_stage_model.encoder.conv_in.bias"
    tensors[key] += 1
    save_file(tensors, tmp_path / "other-vae.safetensors", metadata=open_state_dict(tmp_path / "untuned.safetensors").metadata)
    lines.clear()
    with pytest.raises(ValueError, match=f"other-vae.safetensors: its VAE differs .*tensor {key}"):
        train_demo(three, tmp_path / "x.safetensors", work_dir=tmp_path / "fresh3", log=lines.append, threads=1,
                   start_from=tmp_path / "other-vae.safetensors")
    assert not any(line.startswith("decoder-only tune") for line in lines)
    assert not (tmp_path / "x.safetensors").exists()


def test_latent_edge_map_marks_outlines_not_flat_areas_or_ramps() -> None:
    """The edge term's weights: an object's outline gets them; a flat area, the inside of the object and a
    gradient background's linear ramp (borders included, for a flat background) get none."""
    from engine.training.diffusion_trainer import latent_edge_map

    ramp = torch.linspace(-1.0, 1.0, 16)[None, None, :, None].expand(1, 4, 16, 16).clone()  # vertical gradient
    latents = ramp.clone()
    latents[:, :, 6:12, 6:12] = 2.0  # a 6x6 "square" object
    edges = latent_edge_map(latents)[0, 0]
    assert edges.shape == (16, 16) and edges.max().item() == pytest.approx(1.0)
    assert edges[8:10, 8:10].abs().max().item() < 1e-6  # inside the object: flat
    assert edges[1:-1, 1:4].abs().max().item() < 1e-5  # the ramp's interior, away from the object
    ring = torch.zeros(16, 16, dtype=torch.bool)
    ring[5:13, 5:13] = True
    ring[7:11, 7:11] = False
    assert edges[ring].min().item() > 0.05 and edges[ring].mean().item() > 0.3
    flat = torch.full((2, 4, 8, 8), 0.7)
    assert latent_edge_map(flat).abs().max().item() < 1e-4  # no outline, border rows included


def test_edge_weight_adds_the_outline_error_and_draws_nothing_more() -> None:
    """``edge_weight`` adds exactly ``edge_weight * mean(edge map * eps error^2)`` to the loss: nothing for flat
    latents, more for latents with an outline, and it takes no random draws (a stage without it trains as before)."""
    from engine.schedule import DiscreteSchedule
    from engine.training.diffusion_trainer import TextToImageModel, diffusion_loss, latent_edge_map, tokenize_captions

    unet, text, _ = _diffusion_setup()
    model = TextToImageModel(unet, text).eval()
    ids = tokenize_captions(["a red circle, blue background"] * 4, load_clip_tokenizer())
    ac = DiscreteSchedule.sd1().alphas_cumprod
    flat = torch.full((4, 4, 4, 4), 0.5)
    outlined = flat.clone()
    outlined[:, :, 1:3, 1:3] = -1.5
    plain, weighted = DiffusionTrainingConfig(), DiffusionTrainingConfig(edge_weight=4.0)

    def loss(latents: torch.Tensor, config: DiffusionTrainingConfig) -> tuple[float, torch.Generator]:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            value = diffusion_loss(model, latents, ids, ac, gen, config).item()
        return value, gen

    (a, gen_a), (b, gen_b) = loss(flat, plain), loss(flat, weighted)
    assert a == b and torch.equal(gen_a.get_state(), gen_b.get_state())
    (a, _), (b, _) = loss(outlined, plain), loss(outlined, weighted)
    # Recompute the term from the same draws: t, noise, then the model's prediction.
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, ac.shape[0], (4,), generator=gen)
    noise = torch.randn(outlined.shape, generator=gen)
    x_t = ac[t].float().sqrt()[:, None, None, None] * outlined + (1 - ac[t].float()).sqrt()[:, None, None, None] * noise
    with torch.no_grad():
        eps_hat = model.unet(x_t, t.float(), model.text_encoder(input_ids=ids).last_hidden_state)
    term = 4.0 * (latent_edge_map(outlined) * (eps_hat - noise).square()).mean().item()
    assert term > 0 and b - a == pytest.approx(term, rel=1e-4)


def test_focused_sampling_draws_small_objects_of_the_named_shapes_at_the_share_asked() -> None:
    import random

    from demo.dataset import focus_indices, focused
    from demo.scenes import random_scene

    rng = random.Random(5)
    scenes = [random_scene(rng, held_out=False) for _ in range(400)]
    focus = focus_indices(scenes, ("star", "hexagon"), "a test")
    assert len(focus) > 0
    for i in focus.tolist():
        assert any(o.size == "small" and o.shape in ("star", "hexagon") for o in scenes[i].objects)
    outside = [i for i in range(len(scenes)) if i not in set(focus.tolist())]
    assert all(not any(o.size == "small" and o.shape in ("star", "hexagon") for o in scenes[i].objects) for i in outside)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(scenes), (4000,), generator=gen)
    in_focus = torch.isin(focused(idx, focus, 0.5, gen), focus).float().mean().item()
    natural = torch.isin(idx, focus).float().mean().item()
    # Half the draws come from the focus set, the other half keep their natural share of it.
    assert abs(in_focus - (0.5 + 0.5 * natural)) < 0.03
    assert torch.equal(focused(idx, focus, 0.0, gen), idx)
    with pytest.raises(ValueError, match="a test: no training scene holds a small star"):
        focus_indices([s for i, s in enumerate(scenes) if i not in set(focus.tolist())], ("star",), "a test")


def test_bad_focus_settings_are_refused_naming_the_stage_before_anything_trains(tmp_path: Path) -> None:
    from dataclasses import replace

    from demo.recipe import DemoRecipe
    from demo.train import train_demo

    recipe = DemoRecipe().scaled(0.0005)
    last = len(recipe.continuations) + 1
    bad_stage = replace(recipe.continuations[-1], focus_shapes=("star", "rhombus"))
    lines: list[str] = []
    with pytest.raises(ValueError, match=f"diffusion stage {last}: focus shapes .*rhombus.*name one or more of circle"):
        train_demo(replace(recipe, continuations=(*recipe.continuations[:-1], bad_stage)), tmp_path / "x.safetensors",
                   work_dir=tmp_path / "work", log=lines.append, threads=1)
    with pytest.raises(ValueError, match="the focused decoder tune: focus share 1.5 must be above 0 and at most 1"):
        train_demo(replace(recipe, decoder_focus_share=1.5), tmp_path / "x.safetensors", work_dir=tmp_path / "work",
                   log=lines.append, threads=1)
    assert lines == [] and not (tmp_path / "x.safetensors").exists()  # nothing trained, nothing written

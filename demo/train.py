"""Training the bundled demo model from its recipe (:class:`demo.recipe.DemoRecipe`) into a single-file checkpoint.

The order of work, and so of every random draw: the VAE (built, started, trained, its latent space calibrated), the
training scenes encoded once with the frozen VAE, the decoder-only tunes, then the diffusion stages (text encoder
and U-Net together, :func:`engine.training.diffusion_trainer.train_text_to_image`, on the batches of
:func:`demo.dataset.diffusion_sampler`). Each part's result is cached in the work folder under a key of the settings
it depends on, so a killed run continues and a changed recipe reuses what still applies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from demo.dataset import check_focus, decoder_sampler, diffusion_sampler, focus_indices, image_tensor, vae_batches
from demo.decoder_tune import train_decoder
from demo.recipe import DEMO_LICENSE, DEMO_MODEL_NAME, DemoRecipe, recipe_json
from demo.scenes import ATTRIBUTE_CLASSES, CAPTION_EDITIONS, Scene, random_scene
from demo.start_from import (
    DECODER_FIELDS, DECODER_FOCUS_FIELDS, EarlierFile, check_earlier_stages, check_earlier_vae, decoder_settings, load_decoder,
    load_earlier_stages,
)
from demo.vae_init import init_block_average_vae
from engine.checkpoint_writer import save_sd1_checkpoint
from engine.text_encoder import build_text_encoder
from engine.tokenizer import load_clip_tokenizer
from engine.training.diffusion_trainer import TextToImageModel, train_text_to_image
from engine.training.vae_trainer import calibrate_latent_scale, train_vae
from engine.unet import UNetModel
from engine.vae import AutoencoderKL

LogFn = Callable[[str], None]


def train_demo(
    recipe: DemoRecipe, out: str | Path, *, work_dir: str | Path | None = None, log: LogFn = print, threads: int | None = None,
    on_checkpoint: Callable[[int, object, AutoencoderKL], None] | None = None, start_from: str | Path | None = None,
) -> dict:
    """Train the VAE, then the text encoder + U-Net, and save the single-file checkpoint. Returns a report.

    ``work_dir`` keeps each stage's result (VAE, encoded dataset, diffusion training state): a run that is
    killed and started again with the same work dir continues where it stopped. ``on_checkpoint(step, ema, vae)``
    is called every 250 diffusion steps, counted across stages (a progress probe).

    ``start_from``: a checkpoint this function wrote for an earlier part of the same recipe (the same settings and
    the first stages of ``continuations``). Its stages are not trained again: the next stage starts from its
    weights, which are exactly the float16-rounded weights that stage would start from in a full run, so the result
    is the one the whole chain gives. The VAE is rebuilt and checked against the file's."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    work = Path(work_dir) if work_dir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    for n, stage in enumerate(recipe.stages, start=1):
        if stage.caption_edition not in CAPTION_EDITIONS:
            raise ValueError(f"diffusion stage {n}: unknown caption_edition {stage.caption_edition} (known: {CAPTION_EDITIONS})")
    # Focus settings are checked before hours of earlier stages are trained, not when their stage begins.
    focused = {f"diffusion stage {n}": (stage.focus_share, stage.focus_shapes)
               for n, stage in enumerate(recipe.stages, start=1) if stage.focus_share}
    if recipe.decoder_steps and recipe.decoder_focus_steps:
        focused["the focused decoder tune"] = (recipe.decoder_focus_share, recipe.decoder_focus_shapes)
    for what, (share, shapes) in focused.items():
        check_focus(what, share, shapes)
    keys = _stage_keys(recipe)
    # A file from another recipe is refused before any work is done.
    earlier_file = check_earlier_stages(Path(start_from), recipe) if start_from is not None else None
    report: dict = {"recipe": recipe_json(recipe)}
    t0 = time.perf_counter()

    vae, report["vae"] = _vae(recipe, work, keys["vae"], log, t0)
    # Training set: scenes without the held-out (colour, shape) pairs, encoded once with the frozen VAE.
    rng = random.Random(recipe.seed + 2)
    scenes = [random_scene(rng, held_out=False) for _ in range(recipe.dataset_size)]
    for what, (_, shapes) in focused.items():
        focus_indices(scenes, shapes, what)  # a focus set with no scene is refused before any training too
    latents = _latents(recipe, vae, scenes, work, keys["latents"], log)
    seconds_here = 0.0  # decoder and diffusion training done by this call (a --start-from run adds them to the file's)
    if earlier_file is not None:
        check_earlier_vae(earlier_file, vae)  # before any training: a file of another VAE is refused at once
    if recipe.decoder_steps:
        seconds_here += _decoder_tunes(recipe, vae, scenes, latents, work, keys, log, report, earlier_file)

    unet = UNetModel(recipe.unet)
    text_encoder = build_text_encoder(recipe.text)
    if earlier_file is not None:
        stages_done, earlier = load_earlier_stages(earlier_file, unet, text_encoder, vae)
        ema = TextToImageModel(unet, text_encoder).eval().requires_grad_(False)
        report["diffusion"] = earlier["diffusion"]
        report["continuations"] = list(earlier.get("continuations", []))[: stages_done - 1]
        report["started_from"] = {"file": Path(start_from).name, "stages": stages_done}
        log(f"starting from {start_from}: its {stages_done} diffusion stage(s) are not trained again")
    else:
        stages_done = 1
        ema, losses, seconds = train_text_to_image(
            unet, text_encoder, load_clip_tokenizer(), diffusion_sampler(scenes, latents, recipe.diffusion), recipe.diffusion,
            log=log, aux_classes=ATTRIBUTE_CLASSES,
            state_file=_diffusion_state_file(work, keys["diffusion"]) if work else None,
            on_checkpoint=(lambda step, ema: on_checkpoint(step, ema, vae)) if on_checkpoint else None,
        )
        report["diffusion"] = _stage_report(losses, seconds)
        report["continuations"] = []
    # The step count on_checkpoint sees runs on across stages.
    done = recipe.diffusion.steps + sum(c.steps for c in recipe.continuations[: stages_done - 1])
    for k, stage in enumerate(recipe.continuations, start=2):
        if k <= stages_done:
            continue
        log(f"diffusion stage {k}: {stage.steps} more steps from stage {k - 1}'s weights")
        unet, text_encoder = (_float16_rounded(copy.deepcopy(m)) for m in (ema.unet, ema.text_encoder))
        ema, losses, seconds = train_text_to_image(
            unet, text_encoder, load_clip_tokenizer(), diffusion_sampler(scenes, latents, stage), stage, log=log,
            aux_classes=ATTRIBUTE_CLASSES, state_file=_diffusion_state_file(work, keys[f"stage{k}"]) if work else None,
            on_checkpoint=(lambda step, ema, done=done: on_checkpoint(done + step, ema, vae)) if on_checkpoint else None,
        )
        report["continuations"].append(_stage_report(losses, seconds))
        seconds_here += seconds
        done += stage.steps
    report["total_seconds"] = time.perf_counter() - t0
    if earlier_file is not None:
        # The whole chain's time: the file's run (VAE and encoding included once) plus what was trained here.
        report["total_seconds"] = earlier.get("total_seconds", 0.0) + seconds_here

    metadata = {
        "modelspec.title": DEMO_MODEL_NAME,
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.license": DEMO_LICENSE,
        "adforge.native_size": str(recipe.size),
        "adforge.recipe": json.dumps(report["recipe"], sort_keys=True),
        "adforge.training": json.dumps({k: v for k, v in report.items() if k != "recipe"}, sort_keys=True),
    }
    save_sd1_checkpoint(out, ema.unet, ema.text_encoder, vae, dtype=torch.float16, metadata=metadata)
    log(f"saved {out} ({Path(out).stat().st_size / 1e6:.1f} MB) after {report['total_seconds']:.0f} s")
    return report


def _vae(recipe: DemoRecipe, work: Path | None, key: str, log: LogFn, t0: float) -> tuple[AutoencoderKL, dict]:
    """The recipe's VAE, frozen, and its report: built, started and trained, or taken from the work folder."""
    vae = AutoencoderKL(recipe.vae)  # (built either way: its random init is a draw the later stages follow)
    vae_file = work / "vae.pt" if work else None
    saved = torch.load(vae_file, weights_only=True) if vae_file and vae_file.exists() else None
    if saved is not None and saved.get("key") == key:
        vae.load_state_dict(saved["weights"])
        vae.eval().requires_grad_(False)
        log(f"reusing the trained VAE from {vae_file}")
        return vae, saved["report"]
    if recipe.vae_init == "block-average":
        init_block_average_vae(vae, seed=recipe.seed)
    elif recipe.vae_init != "random":
        raise ValueError(f"unknown VAE start {recipe.vae_init!r} (block-average or random)")
    vae_losses: list[float] = []
    if recipe.vae_steps:
        batches = vae_batches(recipe.seed, recipe.vae_batch, recipe.size, recipe.vae_crop)
        vae_losses = train_vae(vae, batches, recipe.vae_steps, lr=recipe.vae_lr, seed=recipe.seed, log=log)
    vae.eval().requires_grad_(False)
    calib_rng = random.Random(recipe.seed + 1)
    k = calibrate_latent_scale(vae, image_tensor([random_scene(calib_rng, held_out=None) for _ in range(64)], recipe.size))
    report = {"first_loss": vae_losses[0] if vae_losses else None,
              "last_loss": sum(vae_losses[-50:]) / len(vae_losses[-50:]) if vae_losses else None,
              "latent_rescale": k, "seconds": time.perf_counter() - t0}
    if vae_file:
        torch.save({"weights": vae.state_dict(), "report": report, "key": key}, vae_file)
    log(f"vae trained in {report['seconds']:.0f} s; latent rescale x{k:.3f}")
    return vae, report


def _latents(recipe: DemoRecipe, vae: AutoencoderKL, scenes: list[Scene], work: Path | None, key: str,
             log: LogFn) -> torch.Tensor:
    """The training scenes' scaled latents, encoded with the frozen VAE (or taken from the work folder)."""
    t = time.perf_counter()
    latents_file = work / "latents.pt" if work else None
    saved = torch.load(latents_file, weights_only=True) if latents_file and latents_file.exists() else None
    if saved is not None and saved.get("key") == key:
        return saved["latents"]
    chunks = []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            chunks.append(vae.encode_latents(image_tensor(scenes[i : i + 64], recipe.size)))
    latents = torch.cat(chunks)
    if latents_file:
        torch.save({"latents": latents, "key": key}, latents_file)
    log(f"encoded {len(scenes)} training scenes in {time.perf_counter() - t:.0f} s; latent std {latents.std().item():.3f}")
    return latents


def _decoder_tunes(recipe: DemoRecipe, vae: AutoencoderKL, scenes: list[Scene], latents: torch.Tensor,
                   work: Path | None, keys: dict[str, str], log: LogFn, report: dict, earlier_file: EarlierFile | None) -> float:
    """Tune the decoder in place (the first tune, then the focused one), or take a --start-from file's tuned decoder;
    their reports go into ``report``. Returns the seconds spent tuning here."""
    seconds = 0.0
    ours = decoder_settings(report["recipe"])
    first_tune = decoder_settings({**report["recipe"], "decoder_focus_steps": 0})
    if earlier_file is not None and earlier_file.decoder in (ours, first_tune):
        load_decoder(earlier_file, vae)
        report["decoder"] = earlier_file.training.get("decoder")
        if earlier_file.decoder == ours and ours != first_tune:
            report["decoder_focus"] = earlier_file.training.get("decoder_focus")
        log(f"reusing the tuned decoder of {earlier_file.path}")
    else:
        report["decoder"] = _tuned_decoder(recipe, vae, scenes, latents, work, keys["decoder"], log)
        seconds += report["decoder"]["seconds"]
    if ours != first_tune and "decoder_focus" not in report:
        # From the first tune's weights rounded to float16, exactly what a file holds: a run started from a file
        # made before the focused tune existed then gives what the whole chain gives.
        _float16_rounded(vae.decoder)
        report["decoder_focus"] = _tuned_decoder(recipe, vae, scenes, latents, work, keys["decoder_focus"], log, focus=True)
        seconds += report["decoder_focus"]["seconds"]
    return seconds


def _tuned_decoder(recipe: DemoRecipe, vae: AutoencoderKL, scenes: list[Scene], latents: torch.Tensor,
                   work: Path | None, key: str, log: LogFn, *, focus: bool = False) -> dict:
    """Tune ``vae``'s decoder in place on the training scenes (or take the work folder's result); its report.
    ``focus``: the second tune (decoder_focus_*), from the weights ``vae`` holds."""
    cache = work / f"decoder-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt" if work else None
    saved = torch.load(cache, weights_only=True) if cache and cache.exists() else None
    if saved is not None and saved.get("key") == key:
        vae.decoder.load_state_dict(saved["weights"])
        log(f"reusing the tuned decoder from {cache}")
        return saved["report"]
    t = time.perf_counter()
    focus_set = ((focus_indices(scenes, recipe.decoder_focus_shapes, "the focused decoder tune"), recipe.decoder_focus_share)
                 if focus else None)
    sample = decoder_sampler(scenes, latents, vae.config.scaling_factor, recipe.size, focus_set)
    steps = recipe.decoder_focus_steps if focus else recipe.decoder_steps
    what = f"focused on small objects ({recipe.decoder_focus_share:.0%} of samples)" if focus else "on all scenes"
    log(f"decoder-only tune {what}: {steps} steps at batch {recipe.decoder_batch}")
    losses = train_decoder(vae, sample, steps, batch_size=recipe.decoder_batch, lr=recipe.decoder_lr,
                           seed=recipe.seed + (4 if focus else 3), log=log)
    report = _stage_report(losses, time.perf_counter() - t)
    if cache:
        torch.save({"weights": vae.decoder.state_dict(), "report": report, "key": key}, cache)
    return report


def _stage_keys(recipe: DemoRecipe) -> dict[str, str]:
    """What each stage's cached result depends on: changing the diffusion settings keeps the trained VAE, and
    adding a continuation keeps every stage before it."""
    r = recipe_json(recipe)
    stages = r.pop("continuations")
    decoder = {k: r.pop(k) for k in DECODER_FIELDS}  # the diffusion stages don't depend on the decoder
    decoder_focus = {k: r.pop(k) for k in DECODER_FOCUS_FIELDS}
    vae = json.dumps({k: r[k] for k in ("size", "vae", "vae_init", "vae_steps", "vae_batch", "vae_lr", "vae_crop", "seed")}, sort_keys=True)
    latents = json.dumps({"vae": vae, "dataset_size": r["dataset_size"]}, sort_keys=True)
    keys = {"vae": vae, "latents": latents, "diffusion": json.dumps(r, sort_keys=True),
            "decoder": json.dumps({"latents": latents, **decoder}, sort_keys=True),
            "decoder_focus": json.dumps({"latents": latents, **decoder, **decoder_focus}, sort_keys=True)}
    for k in range(2, len(stages) + 2):
        keys[f"stage{k}"] = json.dumps({"base": r, "continuations": stages[: k - 1]}, sort_keys=True)
    return keys


def _stage_report(losses: list[float], seconds: float) -> dict:
    return {"first_loss": sum(losses[:50]) / max(1, len(losses[:50])), "last_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
            "seconds": seconds}


@torch.no_grad()
def _float16_rounded(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.copy_(p.half().float())
    return module


def _diffusion_state_file(work: Path, key: str) -> Path:
    """One state file per full recipe, so a changed recipe never resumes another recipe's optimizer."""
    return work / f"diffusion-state-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"

"""SDXL base + refiner: the refiner finishes the base's latent from the switch on, as diffusers' two-pipeline
ensemble does (base ``denoising_end``, refiner ``denoising_start``): the same pixels within 2/255 on tiny random
files, the refiner's file written here in the real layout (bigG alone under ``conditioner.embedders.0.model.``,
``label_emb`` fed the pooled output + original size, crop and aesthetic score)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from engine.checkpoint import open_state_dict  # noqa: E402
from engine.checkpoint_writer import checkpoint_metadata, save_checkpoint, sdxl_refiner_state_dict  # noqa: E402
from engine.families import detect_family  # noqa: E402
from engine.open_clip import SDXL_CLIP_G_PREFIX, SDXL_REFINER_CLIP_G_PREFIX  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline, base_steps  # noqa: E402
from engine.random_checkpoint import random_models, random_spec, write_random  # noqa: E402
from engine.sampler_names import get_sampler  # noqa: E402
from tests.engine.test_family_pipelines import (  # noqa: E402
    CFG, NEGATIVES, PROMPTS, SEEDS, SIZE, STEPS, _clip_l, _noise, _open_clip, _pixels, _scheduler, _unet, _vae,
)
from tests.engine.test_open_clip import hf_tokenizer  # noqa: E402

SWITCH = 0.6


def _write_refiner(path: Path) -> Path:
    spec = random_spec("sdxl", "tiny")
    g = spec.text_2
    unet = replace(spec.unet, context_dim=g.hidden_size, adm_in_channels=g.projection_dim + 5 * 256)
    models = random_models(replace(spec, unet=unet), seed=11)
    tensors = sdxl_refiner_state_dict(models.unet, models.text_encoder_2, models.vae)
    save_checkpoint(path, tensors, checkpoint_metadata(models.unet, [models.text_encoder_2]) | {"adforge.native_size": "128"})
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("refiner")
    base_path = Path(write_random(root / "sdxl.safetensors", "sdxl", seed=5))
    refiner_path = _write_refiner(root / "refiner.safetensors")
    assert detect_family(open_state_dict(refiner_path)).name == "sdxl-refiner"
    base = Pipeline.load(base_path, device="cpu", dtype="float32")
    base.refiner = Pipeline.load(refiner_path, device="cpu", dtype="float32")
    bf, rf = load_file(str(base_path)), load_file(str(refiner_path))
    m, r = base.models, base.refiner.models
    ref_base = StableDiffusionXLPipeline(
        vae=_vae(bf, m.vae.config), text_encoder=_clip_l(bf, m.text_encoder),
        text_encoder_2=_open_clip(bf, SDXL_CLIP_G_PREFIX, m.text_encoder_2, drop_last=False),
        tokenizer=hf_tokenizer("<|endoftext|>"), tokenizer_2=hf_tokenizer("!"), unet=_unet(bf, base),
        scheduler=_scheduler("eps"), add_watermarker=False)
    ref_refiner = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(rf, r.vae.config), text_encoder=None, tokenizer=None,
        text_encoder_2=_open_clip(rf, SDXL_REFINER_CLIP_G_PREFIX, r.text_encoder, drop_last=False),
        tokenizer_2=hf_tokenizer("!"), unet=_unet(rf, base.refiner), scheduler=_scheduler("eps"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    for p in (ref_base, ref_refiner):
        p.set_progress_bar_config(disable=True)
    return base, ref_base, ref_refiner


def test_base_steps_follow_diffusers_timestep_cutoff(pair) -> None:
    base, ref_base, _ = pair
    sigmas = base._sigmas(GenerationRequest(prompt="", seed=0, steps=STEPS, sampler="Euler"), get_sampler("Euler"))
    sched = ref_base.scheduler
    sched.set_timesteps(STEPS)
    cutoff = round(1000 - SWITCH * 1000)
    assert base_steps(base.schedule, sigmas, SWITCH) == int((sched.timesteps >= cutoff).sum())
    assert base_steps(base.schedule, sigmas, None) == STEPS


def test_base_plus_refiner_renders_the_pixels_diffusers_renders(pair) -> None:
    base, ref_base, ref_refiner = pair
    reqs = [GenerationRequest(prompt=p, negative_prompt=n, seed=s, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                              sampler="Euler", refiner_switch=SWITCH) for p, n, s in zip(PROMPTS, NEGATIVES, SEEDS)]
    results = base.generate(reqs)
    ours = np.stack([np.asarray(r.image, dtype=np.int16) for r in results])
    sizes = {"original_size": (SIZE, SIZE), "target_size": (SIZE, SIZE), "crops_coords_top_left": (0, 0)}
    latents = ref_base(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=CFG,
                       latents=_noise(base), denoising_end=SWITCH, output_type="latent", **sizes).images
    images = ref_refiner(prompt=PROMPTS, negative_prompt=NEGATIVES, image=latents, num_inference_steps=STEPS,
                         guidance_scale=CFG, denoising_start=SWITCH, output_type="np",
                         original_size=(SIZE, SIZE), target_size=(SIZE, SIZE), crops_coords_top_left=(0, 0)).images
    want = _pixels(images)
    diff = int(np.abs(ours - want).max())
    print(f"max pixel difference base + refiner: {diff}/255")
    assert diff <= 2
    assert float(ours.std()) > 10  # the comparison has signal
    plain = base.generate([replace(r, refiner_switch=None) for r in reqs])
    assert not np.array_equal(ours, np.stack([np.asarray(r.image, dtype=np.int16) for r in plain]))
    assert results[0].parameters["Refiner switch at"] == "0.6" and results[0].parameters["Refiner"].startswith("refiner [")

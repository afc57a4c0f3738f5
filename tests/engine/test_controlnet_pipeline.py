"""Our pipeline with ControlNets renders what diffusers' StableDiffusionControlNetPipeline /
StableDiffusionXLControlNetPipeline render on the same tiny random checkpoint, ControlNet files and initial noise.

diffusers gets its U-Net and VAE through its single-file converters from our checkpoint file, and its ControlNets
through convert_controlnet_checkpoint from our ControlNet files (read back with safetensors, not with our loader). Both
are handed the same prompt embeddings (ours), so the comparison is of the ControlNet path: the hint, the residuals, their
strength, the guidance window (diffusers' controlnet_keep) and the sum over several ControlNets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from engine.adapters.refs import AdapterFile  # noqa: E402
from engine.control_images import prepare_control_image  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.random_checkpoint import write_random  # noqa: E402
from engine.random_controlnet import write_random_controlnet  # noqa: E402
from engine.requests import ControlUse  # noqa: E402
from tests.engine.test_controlnet import diffusers_controlnet  # noqa: E402
from tests.engine.test_family_pipelines import _noise, _pixels, _scheduler, _unet, _vae  # noqa: E402

SIZE, STEPS, CFG = 64, 4, 5.0
PROMPTS = ["a red cube on a table", "a blue sphere"]
NEGATIVES = ["blurry", "low quality"]
SEEDS = [7, 1234]
PIXEL_TOL = 2  # of 255
LATENT_TOL = 1e-3


def _shapes() -> tuple[Image.Image, Image.Image]:
    a = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(a).rectangle((12, 16, 50, 44), outline="white", width=2)
    b = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(b).ellipse((8, 8, 56, 56), fill=(200, 200, 200))
    return prepare_control_image("canny", a, SIZE, SIZE), prepare_control_image("softedge", b, SIZE, SIZE)


def _setup(tmp: Path, family: str, seed: int):
    path = Path(write_random(tmp / f"{family}.safetensors", family, seed=seed))
    ours = Pipeline.load(path, device="cpu", dtype="float32")
    file = load_file(str(path))
    nets = []
    for i in range(2):
        cn_path = Path(write_random_controlnet(tmp / f"{family}-cn{i}.safetensors", family, seed=seed + 10 + i))
        loaded = ours.controlnets.load(AdapterFile(cn_path.stem, str(cn_path)))
        nets.append((cn_path, diffusers_controlnet(loaded.model, 256, load_file(str(cn_path)))))
    return ours, file, nets


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    ours, file, nets = _setup(tmp_path_factory.mktemp("cn-sd1"), "sd1", 3)
    ref = StableDiffusionControlNetPipeline(
        vae=_vae(file, ours.models.vae.config), text_encoder=None, tokenizer=None, unet=_unet(file, ours),
        controlnet=nets[0][1], scheduler=_scheduler("eps"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref, nets


def _uses(nets, images, strengths, windows) -> tuple[ControlUse, ...]:
    return tuple(ControlUse(AdapterFile(p.stem, str(p)), im, "canny", s, *w)
                 for (p, _), im, s, w in zip(nets, images, strengths, windows))


def _compare(ours: Pipeline, ref, controls: tuple[ControlUse, ...], extra: dict) -> float:
    reqs = [GenerationRequest(prompt=p, negative_prompt=n, seed=s, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                              sampler="Euler", controls=controls) for p, n, s in zip(PROMPTS, NEGATIVES, SEEDS)]
    results = ours.generate(reqs)
    mine = np.stack([np.asarray(r.image, dtype=np.int16) for r in results])
    latents = torch.stack([r.latents for r in results])  # type: ignore[misc]
    common = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, **extra)
    theirs_latents = ref(**common, latents=_noise(ours).clone(), output_type="latent").images
    diff = float((latents - theirs_latents).abs().max())
    assert diff < LATENT_TOL * max(1.0, float(theirs_latents.abs().max())), diff
    theirs = _pixels(ref(**common, latents=_noise(ours).clone(), output_type="np").images)
    assert int(np.abs(mine - theirs).max()) <= PIXEL_TOL
    assert ((mine > 2) & (mine < 253)).mean() > 0.3  # not saturated: the comparison means something
    return diff


def _sd1_embeds(ours: Pipeline) -> dict:
    cond = ours.prompts.encode_batch(PROMPTS + NEGATIVES)
    return {"prompt_embeds": cond[:2], "negative_prompt_embeds": cond[2:]}


def test_one_controlnet_matches_diffusers_and_steers(sd1) -> None:
    ours, ref, nets = sd1
    edges, _ = _shapes()
    ref.controlnet = nets[0][1]
    _compare(ours, ref, _uses(nets[:1], [edges], [1.0], [(0.0, 1.0)]), {**_sd1_embeds(ours), "image": edges})
    plain = ours.generate([GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], seed=SEEDS[0], width=SIZE,
                                             height=SIZE, steps=STEPS, cfg_scale=CFG, sampler="Euler")])[0]
    steered = ours.generate([GenerationRequest(prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], seed=SEEDS[0], width=SIZE,
                                               height=SIZE, steps=STEPS, cfg_scale=CFG, sampler="Euler",
                                               controls=_uses(nets[:1], [edges], [1.0], [(0.0, 1.0)]))])[0]
    assert np.abs(np.asarray(plain.image, dtype=int) - np.asarray(steered.image, dtype=int)).mean() > 2
    assert steered.parameters["ControlNet 0"].startswith(f"Module: canny, Model: {nets[0][0].stem} [")


def test_strength_and_guidance_window_match_diffusers(sd1) -> None:
    ours, ref, nets = sd1
    edges, _ = _shapes()
    ref.controlnet = nets[0][1]
    _compare(ours, ref, _uses(nets[:1], [edges], [0.5], [(0.2, 0.8)]),
             {**_sd1_embeds(ours), "image": edges, "controlnet_conditioning_scale": 0.5,
              "control_guidance_start": 0.2, "control_guidance_end": 0.8})


def test_two_controlnets_match_diffusers_multicontrolnet(sd1) -> None:
    ours, ref, nets = sd1
    images = list(_shapes())
    multi = StableDiffusionControlNetPipeline(**{**ref.components, "controlnet": [n for _, n in nets]})
    multi.set_progress_bar_config(disable=True)
    _compare(ours, multi, _uses(nets, images, [0.7, 0.4], [(0.0, 1.0), (0.25, 1.0)]),
             {**_sd1_embeds(ours), "image": images, "controlnet_conditioning_scale": [0.7, 0.4],
              "control_guidance_start": [0.0, 0.25], "control_guidance_end": [1.0, 1.0]})


def test_sdxl_controlnet_matches_diffusers(tmp_path_factory: pytest.TempPathFactory) -> None:
    ours, file, nets = _setup(tmp_path_factory.mktemp("cn-sdxl"), "sdxl", 5)
    ref = StableDiffusionXLControlNetPipeline(
        vae=_vae(file, ours.models.vae.config), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=_unet(file, ours), controlnet=nets[0][1], scheduler=_scheduler("eps"), add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    edges, _ = _shapes()
    context, pooled = ours.prompts.encode_batch(PROMPTS + NEGATIVES)
    embeds = {"prompt_embeds": context[:2], "negative_prompt_embeds": context[2:], "pooled_prompt_embeds": pooled[:2],
              "negative_pooled_prompt_embeds": pooled[2:]}
    _compare(ours, ref, _uses(nets[:1], [edges], [0.8], [(0.0, 0.75)]),
             {**embeds, "image": edges, "controlnet_conditioning_scale": 0.8, "control_guidance_end": 0.75})

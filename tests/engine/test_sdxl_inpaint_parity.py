"""SDXL inpainting (a 9-channel SDXL U-Net) against diffusers' ``StableDiffusionXLInpaintPipeline`` on the same tiny
random weights: the masked half repainted to the same pixels (within 2/255), the kept half kept.

At strength 0.75 both sides start from the image's latent plus noise at the first step's sigma and run the last
three quarters of the schedule; the masked image the U-Net sees is the image with the masked area at mid-grey.
We encode images to the posterior mean (deterministic img2img); diffusers samples the posterior with the request's
generator by default, so the reference is run with its ``retrieve_latents`` taking the mode (= the mean), which
also leaves each generator to draw exactly the noise ours draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import StableDiffusionXLInpaintPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from engine.open_clip import SDXL_CLIP_G_PREFIX  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.random_checkpoint import write_random  # noqa: E402
from tests.engine.test_family_pipelines import (  # noqa: E402
    CFG, NEGATIVES, PROMPTS, SEEDS, SIZE, _clip_l, _open_clip, _pixels, _scheduler, _unet, _vae,
)
from tests.engine.test_open_clip import hf_tokenizer  # noqa: E402

STEPS, STRENGTH = 8, 0.75


def _init_and_mask() -> tuple[Image.Image, Image.Image]:
    ramp = np.tile(np.linspace(30, 220, SIZE, dtype=np.uint8)[None, :, None], (SIZE, 1, 3))
    ramp[..., 1] = ramp[..., 1][::-1]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    return Image.fromarray(ramp, "RGB"), Image.fromarray(mask, "L")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    path = Path(write_random(tmp_path_factory.mktemp("xlinpaint") / "sdxl-inpaint.safetensors", "sdxl", seed=4, inpaint=True))
    ours = Pipeline.load(path, device="cpu", dtype="float32")
    assert ours.models.family.name == "sdxl-inpaint"
    file = load_file(str(path))
    m = ours.models
    ref = StableDiffusionXLInpaintPipeline(
        vae=_vae(file, m.vae.config), text_encoder=_clip_l(file, m.text_encoder),
        text_encoder_2=_open_clip(file, SDXL_CLIP_G_PREFIX, m.text_encoder_2, drop_last=False),
        tokenizer=hf_tokenizer("<|endoftext|>"), tokenizer_2=hf_tokenizer("!"), unet=_unet(file, ours),
        scheduler=_scheduler("eps"), requires_aesthetics_score=False, force_zeros_for_empty_prompt=False,
        add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def test_sdxl_inpainting_repaints_what_diffusers_repaints(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module

    real = inpaint_module.retrieve_latents
    monkeypatch.setattr(inpaint_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, None, sample_mode="argmax"))
    ours, ref = pair
    init, mask = _init_and_mask()
    reqs = [GenerationRequest(prompt=p, negative_prompt=n, seed=s, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                              sampler="Euler", init_image=init, mask=mask, mask_blur=0, strength=STRENGTH)
            for p, n, s in zip(PROMPTS, NEGATIVES, SEEDS)]
    mine = np.stack([np.asarray(r.image, dtype=np.int16) for r in ours.generate(reqs)])
    theirs = _pixels(ref(prompt=PROMPTS, negative_prompt=NEGATIVES, image=[init] * 2, mask_image=[mask] * 2,
                         height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG, strength=STRENGTH,
                         latents=None, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                         original_size=(SIZE, SIZE), target_size=(SIZE, SIZE), crops_coords_top_left=(0, 0),
                         output_type="np").images)
    kept = np.asarray(init, dtype=np.int16)
    half = SIZE // 2
    assert all(np.array_equal(img[:, half:], kept[:, half:]) for img in mine)  # ours keeps the unmasked pixels exactly
    diff = int(np.abs(mine[:, :, :half] - theirs[:, :, :half]).max())
    print(f"max pixel difference in the repainted half: {diff}/255")
    assert np.abs(mine[:, :, :half] - kept[None, :, :half]).mean() > 5  # it was repainted
    assert diff <= 2, diff

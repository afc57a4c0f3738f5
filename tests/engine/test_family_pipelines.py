"""The proof that SD 2.x (eps and v) and SDXL render what they should: the same seed, sampler and settings give the
same pixels as diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` on the same tiny random weights.

diffusers gets its networks through its own single-file converters, from the tensors of the file we wrote (U-Net,
VAE, both OpenCLIP towers and SDXL's CLIP-L), so the layout of our writer and the reading of our loader are checked
as well as the maths of the pipeline. Its SD 2.x text encoder is built the way diffusers builds it from a real file:
the OpenCLIP tower without its last block, read at its last layer through the final norm.

Sampler: ours "Euler" (k-diffusion's default schedule, t = linspace(999, 0, n)) against ``EulerDiscreteScheduler`` with
``timestep_spacing="linspace"``; diffusers is handed the initial noise our pipeline draws (one CPU generator per image,
float32) and multiplies it by ``init_noise_sigma``, which for linspace spacing is sigma_max, as ours does. Five
steps put every timestep but the first and last between training steps (749.25, 499.5, 249.75), where diffusers
interpolates sigma linearly and we interpolate log-sigma: the difference is far below the tolerance.

When a comparison fails, the stages are checked in order -- prompt embeddings, the U-Net's first call, the final
latent, the pixels -- so the first failing assertion says which side to look at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file  # noqa: E402

from engine.open_clip import SD2_PREFIX, SDXL_CLIP_G_PREFIX  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.random_checkpoint import write_random  # noqa: E402
from engine.text_encoder import TextEncoderConfig, build_text_encoder, reset_position_ids  # noqa: E402
from engine.unet import sdxl_size_embedding  # noqa: E402
from engine.vae import VAEConfig  # noqa: E402
from tests.engine.test_open_clip import hf_tokenizer  # noqa: E402
from tests.engine.test_unet_parity import diffusers_config  # noqa: E402

SIZE, STEPS, CFG = 64, 5, 5.0
PROMPTS = ["a red cube on a wooden table, studio light", "a blue sphere"]
NEGATIVES = ["blurry", "low quality, jpeg artifacts"]  # non-empty: diffusers' SDXL zeroes empty negatives
SEEDS = [7, 1234]
PIXEL_TOL = 2  # of 255
LATENT_TOL = 1e-3
EMBED_TOL = 1e-5
CPU = torch.device("cpu")


def _scheduler(prediction: str) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="linspace", steps_offset=1, prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )


def _unet(file: dict[str, torch.Tensor], ours: Pipeline) -> UNet2DConditionModel:
    dcfg = diffusers_config(ours.models.unet.config, size_dim=256)
    unet = UNet2DConditionModel(**dcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(file, dcfg), strict=True)
    return unet.eval()


def _vae(file: dict[str, torch.Tensor], config: VAEConfig) -> DiffusersVAE:
    levels = len(config.ch_mult)
    dcfg = {
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels, "norm_num_groups": 32, "sample_size": SIZE,
        "scaling_factor": config.scaling_factor,
    }
    vae = DiffusersVAE(**dcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(file, dcfg), strict=True)
    return vae.eval()


def _open_clip(file: dict[str, torch.Tensor], prefix: str, ours, *, drop_last: bool):
    """diffusers' conversion of an OpenCLIP tower into a fresh transformers model shaped like ours (SD 2.x: without the
    last block, as diffusers' SD 2.x text encoder is)."""
    c = ours.config
    layers = c.num_hidden_layers - (1 if drop_last else 0)
    projection = getattr(c, "projection_dim", None) if hasattr(ours, "text_projection") else None
    model = build_text_encoder(TextEncoderConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_layers=layers,
        num_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
        projection_dim=projection))
    converted = convert_open_clip_checkpoint(model, file, prefix=prefix)
    want = model.state_dict()
    if projection is None:  # a CLIPTextModel: names without the text_model. level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    dropped = {k for k in converted if k not in want}
    assert all(".text_projection" in f".{k}" or f"encoder.layers.{layers}." in k for k in dropped), sorted(dropped)
    model.load_state_dict({k: v for k, v in converted.items() if k in want}, strict=True)
    reset_position_ids(model, "cpu")
    return model.eval()


def _clip_l(file: dict[str, torch.Tensor], ours):
    model = build_text_encoder(TextEncoderConfig(
        vocab_size=ours.config.vocab_size, hidden_size=ours.config.hidden_size,
        intermediate_size=ours.config.intermediate_size, num_layers=ours.config.num_hidden_layers,
        num_heads=ours.config.num_attention_heads, max_position_embeddings=ours.config.max_position_embeddings))
    converted = convert_ldm_clip_checkpoint(file)
    model.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()
                           if not k.endswith("position_ids")}, strict=True)
    reset_position_ids(model, "cpu")
    return model.eval()


def _noise(pipe: Pipeline) -> torch.Tensor:
    """The initial noise our pipeline draws: one CPU generator per image, float32."""
    f = pipe.vae_factor
    shape = (pipe.latent_channels, SIZE // f, SIZE // f)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in SEEDS])


def _ours(pipe: Pipeline) -> tuple[np.ndarray, torch.Tensor]:
    reqs = [GenerationRequest(prompt=p, negative_prompt=n, seed=s, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                              sampler="Euler") for p, n, s in zip(PROMPTS, NEGATIVES, SEEDS)]
    results = pipe.generate(reqs)
    pixels = np.stack([np.asarray(r.image, dtype=np.int16) for r in results])
    return pixels, torch.stack([r.latents for r in results])  # type: ignore[misc]


def _pixels(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0, 1) * 255).astype(np.int16)


def _check_not_degenerate(pixels: np.ndarray) -> None:
    # A saturated or flat image would match anything: the random model must give pixels that carry signal.
    mid = ((pixels > 2) & (pixels < 253)).mean()
    assert mid > 0.5 and pixels.std() > 10, (mid, pixels.std())
    assert np.abs(pixels[0] - pixels[1]).mean() > 5  # two seeds, two prompts: two images


def _first_unet_call(pipe: Pipeline, ref_unet: UNet2DConditionModel, context: torch.Tensor, added: dict | None) -> None:
    """Both U-Nets on the same input at the first step's timestep."""
    x = _noise(pipe)
    t = torch.full((len(SEEDS),), 999.0)
    y = None if added is None else torch.cat([added["text_embeds"], sdxl_size_embedding(added["time_ids"])], dim=-1)
    with torch.no_grad():
        ours = pipe.models.unet(x, t, context, y)
        theirs = ref_unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert ours.abs().mean() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _compare(pipe: Pipeline, ref, call_kw: dict) -> dict[str, float]:
    """Run both; assert latents then pixels; return the differences (for the report)."""
    ours_pixels, ours_latents = _ours(pipe)
    noise = _noise(pipe)
    common = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=CFG, **call_kw)
    theirs_latents = ref(**common, latents=noise.clone(), output_type="latent").images
    latent_diff = float((ours_latents - theirs_latents).abs().max())
    assert latent_diff < LATENT_TOL * max(1.0, float(theirs_latents.abs().max())), latent_diff
    theirs = _pixels(ref(**common, latents=noise.clone(), output_type="np").images)
    assert theirs.shape == ours_pixels.shape == (len(SEEDS), SIZE, SIZE, 3)
    _check_not_degenerate(ours_pixels)
    pixel_diff = int(np.abs(ours_pixels - theirs).max())
    assert pixel_diff <= PIXEL_TOL, pixel_diff
    return {"latent": latent_diff, "pixels": pixel_diff}


# ---- SD 2.x ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd2", "sd2-v"])
def sd2(request, tmp_path_factory: pytest.TempPathFactory):
    path = Path(write_random(tmp_path_factory.mktemp("fam") / f"{request.param}.safetensors", request.param, seed=3))
    ours = Pipeline.load(path, device="cpu", dtype="float32")
    file = load_file(str(path))
    text = _open_clip(file, SD2_PREFIX, ours.models.text_encoder, drop_last=True)
    ref = StableDiffusionPipeline(
        vae=_vae(file, ours.models.vae.config), text_encoder=text, tokenizer=hf_tokenizer("!"),
        unet=_unet(file, ours), scheduler=_scheduler(ours.models.prediction), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return request.param, ours, ref


def test_sd2_scheduler_starts_where_ours_does(sd2) -> None:
    _, ours, ref = sd2
    ref.scheduler.set_timesteps(STEPS)
    ours_sigmas = ours.schedule.default_sigmas(STEPS)
    assert float(ref.scheduler.init_noise_sigma) == pytest.approx(ours.schedule.sigma_max, rel=1e-5)
    torch.testing.assert_close(ref.scheduler.sigmas.float(), ours_sigmas, rtol=1e-4, atol=1e-6)
    assert ref.scheduler.timesteps.tolist() == pytest.approx([999.0, 749.25, 499.5, 249.75, 0.0])


def test_sd2_prompt_embeddings_and_first_unet_call_equal_diffusers(sd2) -> None:
    name, ours, ref = sd2
    assert ours.models.prediction == ("v" if name == "sd2-v" else "eps")
    cond = ours.prompts.encode_batch(PROMPTS + NEGATIVES)
    want_c, want_u = ref.encode_prompt(PROMPTS, CPU, 1, True, NEGATIVES)
    torch.testing.assert_close(cond, torch.cat([want_c, want_u]), rtol=0, atol=EMBED_TOL)
    _first_unet_call(ours, ref.unet, want_c, None)


def test_sd2_renders_the_pixels_diffusers_renders(sd2) -> None:
    _, ours, ref = sd2
    diffs = _compare(ours, ref, {})
    print(f"max differences {sd2[0]}: {diffs}")


# ---- SDXL -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory):
    path = Path(write_random(tmp_path_factory.mktemp("fam") / "sdxl.safetensors", "sdxl", seed=5))
    ours = Pipeline.load(path, device="cpu", dtype="float32")
    file = load_file(str(path))
    m = ours.models
    ref = StableDiffusionXLPipeline(
        vae=_vae(file, m.vae.config), text_encoder=_clip_l(file, m.text_encoder),
        text_encoder_2=_open_clip(file, SDXL_CLIP_G_PREFIX, m.text_encoder_2, drop_last=False),
        tokenizer=hf_tokenizer("<|endoftext|>"), tokenizer_2=hf_tokenizer("!"), unet=_unet(file, ours),
        scheduler=_scheduler(m.prediction), add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ours, ref


SDXL_SIZES = {"original_size": (SIZE, SIZE), "target_size": (SIZE, SIZE), "crops_coords_top_left": (0, 0)}


def test_sdxl_prompt_embeddings_and_first_unet_call_equal_diffusers(sdxl) -> None:
    ours, ref = sdxl
    assert ours.models.prediction == "eps" and ours.models.vae.config.scaling_factor == ref.vae.config.scaling_factor
    context, pooled = ours.prompts.encode_batch(PROMPTS + NEGATIVES)
    want_c, want_u, want_pc, want_pu = ref.encode_prompt(PROMPTS, device=CPU, do_classifier_free_guidance=True,
                                                         negative_prompt=NEGATIVES)
    torch.testing.assert_close(context, torch.cat([want_c, want_u]), rtol=0, atol=EMBED_TOL)
    torch.testing.assert_close(pooled, torch.cat([want_pc, want_pu]), rtol=0, atol=EMBED_TOL)
    time_ids = ref._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                     text_encoder_projection_dim=ref.text_encoder_2.config.projection_dim)
    time_ids = time_ids.repeat(len(SEEDS), 1)
    # our y for these requests is what diffusers' add_embedding is fed
    _, y = ours._conditioning([GenerationRequest(prompt=p, negative_prompt=n, seed=s, width=SIZE, height=SIZE)
                               for p, n, s in zip(PROMPTS, NEGATIVES, SEEDS)])
    assert y is not None
    torch.testing.assert_close(y[: len(SEEDS)], torch.cat([want_pc, sdxl_size_embedding(time_ids)], dim=-1), rtol=0, atol=EMBED_TOL)
    _first_unet_call(ours, ref.unet, want_c, {"text_embeds": want_pc, "time_ids": time_ids})


def test_sdxl_renders_the_pixels_diffusers_renders(sdxl) -> None:
    ours, ref = sdxl
    diffs = _compare(ours, ref, SDXL_SIZES)
    print(f"max differences sdxl: {diffs}")

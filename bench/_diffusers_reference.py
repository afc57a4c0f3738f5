"""The diffusers side of bench/engine_vs_diffusers.py: diffusers' SD 1.5 U-Net and VAE holding the weights of our
checkpoint file, and the worker that samples with them in the standard StableDiffusionPipeline loop.

Nothing here imports the engine, so the diffusers worker's RSS stays diffusers' own.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench._worker_common import maxrss_mb, profile_table, rss_mb, setup_threads, shared_inputs

__all__ = ["dpmpp_2m_karras", "load_diffusers_models", "load_diffusers_sdxl_models", "run_diffusers", "sd15_pipeline"]

VAE_SCALE = 0.18215


def _diffusers_unet_config(u: dict) -> dict:
    levels = range(len(u["channel_mult"]))
    return {
        "sample_size": 64,
        "in_channels": u["in_channels"],
        "out_channels": u["out_channels"],
        "block_out_channels": [u["model_channels"] * m for m in u["channel_mult"]],
        "layers_per_block": u["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if i in u["attention_levels"] else "DownBlock2D" for i in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if i in u["attention_levels"] else "UpBlock2D" for i in reversed(levels)],
        "cross_attention_dim": u["context_dim"],
        "attention_head_dim": u["num_heads"],  # diffusers' legacy name: for SD 1.x it is the head count
        "use_linear_projection": False,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def _diffusers_vae_config(v: dict, size: int, scaling_factor: float = VAE_SCALE) -> dict:
    n = len(v["ch_mult"])
    return {
        "sample_size": size,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [v["ch"] * m for m in v["ch_mult"]],
        "layers_per_block": v["num_res_blocks"],
        "latent_channels": v["z_channels"],
        "norm_num_groups": 32,
        "scaling_factor": scaling_factor,
    }


def load_diffusers_models(path, preset: dict):
    """diffusers' UNet2DConditionModel and AutoencoderKL holding the same weights as our checkpoint file, converted
    offline with diffusers' own LDM converters (built on the meta device, then assigned: no double copy)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt", device="cpu")
    ckpt = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    ucfg = _diffusers_unet_config(preset["unet"])
    vcfg = _diffusers_vae_config(preset["vae"], preset["size"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**vcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True, assign=True)
    return unet, vae


def load_diffusers_sdxl_models(path, unet_cfg: dict, vae_cfg: dict, size: int, scaling_factor: float = 0.13025):
    """SDXL: diffusers' UNet2DConditionModel (SDXL base config, ``addition_embed_type="text_time"``) and
    AutoencoderKL holding the U-Net and VAE tensors of our single-file checkpoint; ``unet_cfg`` is
    bench._sdxl_unet's plain dict, ``vae_cfg`` has engine.vae.VAEConfig's field names. The VAE keeps diffusers'
    default ``force_upcast=True``, as the SDXL base VAE's published config does (it overflows in float16)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors import safe_open

    from bench._sdxl_unet import diffusers_sdxl_unet_config

    handle = safe_open(str(path), framework="pt", device="cpu")
    ckpt = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    ucfg = diffusers_sdxl_unet_config(unet_cfg)
    vcfg = _diffusers_vae_config(vae_cfg, size, scaling_factor)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**vcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True, assign=True)
    return unet, vae


def dpmpp_2m_karras():
    """diffusers' DPM++ 2M Karras over SD 1.x's scaled-linear betas (the sampler every SD 1.5 bench runs)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
    )


def sd15_pipeline(path, preset: dict, device, dtype):
    """diffusers' StableDiffusionPipeline over the file's U-Net and VAE (no text encoder: the benches hand it fixed
    embeddings), on ``device`` in ``dtype``, DPM++ 2M Karras, quiet; returns (pipeline, unet, vae)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    unet, vae = load_diffusers_models(path, preset)
    unet.to(device, dtype).eval().requires_grad_(False)
    vae.to(device, dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=dpmpp_2m_karras(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet, vae


def run_diffusers(preset: dict, path: Path, args) -> dict:
    import numpy as np
    import torch

    setup_threads(args.threads)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    rss_import = maxrss_mb()
    t0 = time.perf_counter()
    unet, vae = load_diffusers_models(path, preset)
    for m in (unet, vae):
        m.eval().requires_grad_(False)
        left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{type(m).__name__}: tensors left on the meta device: {left[:5]}")
    sched = dpmpp_2m_karras()
    load_s = time.perf_counter() - t0
    rss_load, rss_load_now = maxrss_mb(), rss_mb()

    noise, cond = shared_inputs(preset, args.seed)
    # diffusers' pipeline order: uncond rows first, then text rows.
    context = torch.cat([cond[1:2], cond[0:1]])
    steps = args.steps + 1
    sched.set_timesteps(steps, device="cpu")
    sigma0 = float(sched.sigmas[0])
    ac = sched.alphas_cumprod.double().numpy()
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    frac_t = [float(sched._sigma_to_t(np.array(float(s)), log_sigmas)) for s in sched.sigmas[:-1]]

    def unet_eps(latents: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        latent_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        t_in = t if args.diffusers_int_t else torch.tensor(frac_t[i], dtype=torch.float32)
        eps = unet(latent_in, t_in, encoder_hidden_states=context, return_dict=False)[0]
        eps_u, eps_c = eps.chunk(2)
        return eps_u + args.cfg * (eps_c - eps_u)

    marks = [time.perf_counter()]
    cpu_marks = [time.process_time()]
    with torch.inference_mode():
        latents = noise * (sigma0 / math.sqrt(sigma0**2 + 1.0))  # VP scale of x = sigma_max * noise
        for i, t in enumerate(sched.timesteps):
            eps = unet_eps(latents, i, t)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
        rss_sampling = maxrss_mb()
        t1 = time.perf_counter()
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = ((images + 1.0) / 2.0).clamp(0.0, 1.0)
        decode_s = time.perf_counter() - t1
    rss_decode = maxrss_mb()

    out = {
        "load_s": load_s,
        "step_s": [b - a for a, b in zip(marks, marks[1:])],
        "step_cpu_s": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])],
        "decode_s": decode_s,
        "rss_import_mb": rss_import,
        "rss_load_mb": rss_load,
        "rss_load_now_mb": rss_load_now,
        "rss_sampling_mb": rss_sampling,
        "rss_decode_mb": rss_decode,
    }
    torch.save({"latents": latents.clone(), "images": images.clone()}, args.out_tensors)

    if args.profile:
        sched.set_timesteps(steps, device="cpu")
        t = sched.timesteps[1]
        x = noise * float(sched.sigmas[1]) / math.sqrt(float(sched.sigmas[1]) ** 2 + 1.0)
        with torch.inference_mode():
            unet_eps(x, 1, t)  # warm
        out["profile"] = profile_table(lambda: unet_eps(x, 1, t))
    return out

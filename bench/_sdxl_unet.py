"""SDXL U-Net step time, ours against diffusers: the ``--family sdxl`` mode of bench/engine_vs_diffusers.py.

The U-Net alone decides the step time (one U-Net call on the CFG pair per step; the sampler arithmetic is a few
element-wise ops and the text encoders and VAE run once per image), so this mode writes, loads and times the U-Net
only. Both workers run the same Euler loop (written once, below) around their own U-Net call, with the same
fixed random context, pooled embedding and size ids, so their final latents must agree.

Nothing here imports the engine or diffusers at module level: each worker imports only its own side, so its peak
RSS is that side's alone. The file writer (parent process) imports the engine for the network's tensor shapes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

from bench._worker_common import maxrss_mb, profile_table, rss_mb, setup_threads

__all__ = ["SDXL_PRESETS", "diffusers_sdxl_unet_config", "run_diffusers_sdxl", "run_ours_sdxl", "unet_dict",
           "write_unet_file"]

UNET_PREFIX = "model.diffusion_model."  # the single-file layout's U-Net prefix (engine.checkpoint.UNET_PREFIX)
SIZE_FEATURES = 6 * 256  # SDXL base: 6 size numbers, each embedded 256 wide, after the pooled text in y

# Plain data (engine.unet.UNetConfig field names), so the diffusers worker never imports the engine.
SDXL_PRESETS: dict[str, dict] = {
    # SDXL base: equals engine.random_checkpoint.random_spec("sdxl", "full").unet (checked when the file is written).
    "full": {
        "unet": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "channel_mult": (1, 2, 4),
                 "num_res_blocks": 2, "num_head_channels": 64, "context_dim": 2048, "use_linear_in_transformer": True,
                 "transformer_depth_per_level": (0, 2, 10), "transformer_depth_middle": 10, "adm_in_channels": 2816},
        "size": 512,
        "file": "sdxl-unet-random-fp16.safetensors",
    },
    # Same topology, narrow and shallow: a smoke run.
    "small": {
        "unet": {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": (1, 2, 4),
                 "num_res_blocks": 2, "num_head_channels": 16, "context_dim": 64, "use_linear_in_transformer": True,
                 "transformer_depth_per_level": (0, 1, 2), "transformer_depth_middle": 2,
                 "adm_in_channels": 32 + SIZE_FEATURES},
        "size": 128,
        "file": "sdxl-unet-small-random-fp16.safetensors",
    },
}


def unet_dict(cfg) -> dict:
    """An engine UNetConfig of an SDXL-shaped U-Net as this module's plain dict."""
    return {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "model_channels": cfg.model_channels,
            "channel_mult": tuple(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
            "num_head_channels": cfg.num_head_channels, "context_dim": cfg.context_dim,
            "use_linear_in_transformer": cfg.use_linear_in_transformer,
            "transformer_depth_per_level": tuple(cfg.level_depths), "transformer_depth_middle": cfg.middle_depth,
            "adm_in_channels": cfg.adm_in_channels}


def diffusers_sdxl_unet_config(u: dict) -> dict:
    """diffusers' UNet2DConditionModel config of an SDXL-shaped U-Net (the base model's published config, sized)."""
    depths = tuple(u["transformer_depth_per_level"])
    # diffusers' middle block takes the last level's depth: no way to say otherwise, so refuse a mismatch.
    if u["transformer_depth_middle"] != depths[-1]:
        raise ValueError(f"diffusers needs the middle depth {u['transformer_depth_middle']} == last level's {depths[-1]}")
    widths = [u["model_channels"] * m for m in u["channel_mult"]]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    return {
        "sample_size": 128,
        "in_channels": u["in_channels"],
        "out_channels": u["out_channels"],
        "block_out_channels": widths,
        "layers_per_block": u["num_res_blocks"],
        "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "transformer_layers_per_block": [max(d, 1) for d in depths],  # 1 where ignored (no attention), as SDXL's
        "attention_head_dim": [w // u["num_head_channels"] for w in widths],  # diffusers' legacy name: head count
        "cross_attention_dim": u["context_dim"],
        "use_linear_projection": u["use_linear_in_transformer"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": u["adm_in_channels"],
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


# ---- the random U-Net file ---------------------------------------------------------------------------------


def write_unet_file(preset: dict, path: Path, seed: int) -> dict:
    """Write a U-Net-only single-file checkpoint (``model.diffusion_model.*``, float16) of random weights, one tensor
    at a time: the header first (shapes from a meta-device network), then each tensor's bytes as it is drawn, so
    the writer never holds more than one tensor (the full SDXL U-Net is 5 GB in float16, 10 GB in float32)."""
    import torch

    from engine.loading import META_UNET_HEAD_CHANNELS
    from engine.random_checkpoint import random_spec
    from engine.unet import UNetConfig, UNetModel

    cfg = UNetConfig(**preset["unet"])
    if preset is SDXL_PRESETS["full"] and cfg != random_spec("sdxl", "full").unet:
        raise RuntimeError("SDXL_PRESETS['full'] no longer matches engine.random_checkpoint's SDXL base shapes")
    from torch import nn

    with torch.device("meta"):
        net = UNetModel(cfg)
    names = list(net.state_dict().items())
    norm_params = {f"{mod_name}.{p_name}" for mod_name, mod in net.named_modules()
                   if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) for p_name, _ in mod.named_parameters(recurse=False)}
    header: dict[str, object] = {"__metadata__": {META_UNET_HEAD_CHANNELS: str(cfg.num_head_channels)}}
    offset = 0
    for name, meta in names:
        n = math.prod(meta.shape) * 2
        header[UNET_PREFIX + name] = {"dtype": "F16", "shape": list(meta.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    gen = torch.Generator("cpu").manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, meta in names:
            shape = tuple(meta.shape)
            value = torch.randn(shape, generator=gen, dtype=torch.float32)
            if name in norm_params:  # GroupNorm / LayerNorm gains and shifts
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * value
            elif len(shape) >= 2:
                value /= math.sqrt(math.prod(shape[1:]))  # unit-variance activations layer to layer
            else:
                value *= 0.05  # biases
            f.write(value.to(torch.float16).numpy().tobytes())
    os.replace(tmp, path)
    return {"params": offset // 2, "bytes": path.stat().st_size}


# ---- shared by both workers --------------------------------------------------------------------------------


def shared_inputs(preset: dict, seed: int):
    """(noise [1, 4, h, w], context [2, 77, ctx], pooled [2, adm - 1536], time ids [2, 6]); row 0 of the CFG pair is
    the prompt, row 1 the negative prompt, on both sides."""
    import torch

    u, size = preset["unet"], preset["size"]
    lat = size // 8
    noise = torch.randn((1, 4, lat, lat), generator=torch.Generator("cpu").manual_seed(seed))
    context = torch.randn((2, 77, u["context_dim"]), generator=torch.Generator("cpu").manual_seed(seed + 1))
    pooled = torch.randn((2, u["adm_in_channels"] - SIZE_FEATURES), generator=torch.Generator("cpu").manual_seed(seed + 2))
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)  # (orig h, w, crop, target h, w)
    return noise, context, pooled, time_ids


def _schedule(steps: int):
    """(timesteps, sigmas) of SD's scaled-linear schedule at ``steps`` evenly spaced fractional timesteps, then 0."""
    import numpy as np

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    train_sigmas = ((1 - ac) / ac) ** 0.5
    ts = np.linspace(999.0, 0.0, steps)
    sigmas = np.interp(ts, np.arange(1000), train_sigmas)
    return [float(t) for t in ts], [float(s) for s in sigmas] + [0.0]


def euler_cfg_sample(eps_pair, noise, steps: int, cfg: float) -> dict:
    """Euler over the schedule: one ``eps_pair(x_in [2, ...], t [2])`` call on the CFG pair per step, timed."""
    import torch

    ts, sigmas = _schedule(steps)
    x = noise * sigmas[0]
    marks, cpu_marks = [time.perf_counter()], [time.process_time()]
    with torch.inference_mode():
        for i, t in enumerate(ts):
            s = sigmas[i]
            x_in = (x / math.sqrt(s * s + 1.0)).expand(2, -1, -1, -1)
            eps = eps_pair(x_in, torch.tensor([t, t], dtype=torch.float32)).float()
            eps = eps[1:2] + cfg * (eps[0:1] - eps[1:2])
            x = x + eps * (sigmas[i + 1] - s)
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
    return {"latents": x, "step_s": [b - a for a, b in zip(marks, marks[1:])],
            "step_cpu_s": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]}


def _finish(eps_pair, preset: dict, args, load_s: float, rss_import: float) -> dict:
    import torch

    rss_load, rss_load_now = maxrss_mb(), rss_mb()
    noise, *_ = shared_inputs(preset, args.seed)
    run = euler_cfg_sample(eps_pair, noise, args.steps + 1, args.cfg)
    out = {"load_s": load_s, "step_s": run["step_s"], "step_cpu_s": run["step_cpu_s"], "rss_import_mb": rss_import,
           "rss_load_mb": rss_load, "rss_load_now_mb": rss_load_now, "rss_sampling_mb": maxrss_mb()}
    torch.save({"latents": run["latents"].clone()}, args.out_tensors)
    if args.profile:
        x = noise.expand(2, -1, -1, -1)
        t = torch.tensor([500.0, 500.0])
        with torch.inference_mode():
            eps_pair(x, t)  # warm
        out["profile"] = profile_table(lambda: eps_pair(x, t))
    return out


# ---- the two workers ---------------------------------------------------------------------------------------


def run_ours_sdxl(preset: dict, path: Path, args) -> dict:
    import torch

    setup_threads(args.threads)
    from engine.checkpoint import open_state_dict
    from engine.families import FAMILIES
    from engine.loading import load_unet
    from engine.unet import sdxl_size_embedding

    rss_import = maxrss_mb()
    t0 = time.perf_counter()
    sdxl = next(f for f in FAMILIES if f.name == "sdxl")
    unet = load_unet(open_state_dict(path), torch.device("cpu"), torch.float32, sdxl)
    load_s = time.perf_counter() - t0
    _, context, pooled, time_ids = shared_inputs(preset, args.seed)
    y = torch.cat([pooled, sdxl_size_embedding(time_ids)], dim=-1)  # what engine.pipeline hands the U-Net
    return _finish(lambda x, t: unet(x, t, context, y), preset, args, load_s, rss_import)


def run_diffusers_sdxl(preset: dict, path: Path, args) -> dict:
    import torch

    setup_threads(args.threads)
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.utils import logging as dlogging
    from safetensors import safe_open

    dlogging.set_verbosity_error()
    rss_import = maxrss_mb()
    t0 = time.perf_counter()
    cfg = diffusers_sdxl_unet_config(preset["unet"])
    handle = safe_open(str(path), framework="pt", device="cpu")
    # float16 in the file, float32 to compute: converted one tensor at a time (no second full copy).
    ckpt = {k: handle.get_tensor(k).float() for k in handle.keys() if k.startswith(UNET_PREFIX)}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, cfg), strict=True, assign=True)
    del ckpt
    unet.eval().requires_grad_(False)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"UNet2DConditionModel: tensors left on the meta device: {left[:5]}")
    load_s = time.perf_counter() - t0
    _, context, pooled, time_ids = shared_inputs(preset, args.seed)
    added = {"text_embeds": pooled, "time_ids": time_ids}

    def eps_pair(x, t):
        return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]

    return _finish(eps_pair, preset, args, load_s, rss_import)

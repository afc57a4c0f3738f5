"""Section b of bench/gpu_suite.py: the SDXL base U-Net, ours against diffusers, eager (and compiled if the budget
allows), the way ``bench/engine_vs_diffusers.py --family sdxl`` measures it on the CPU.

The U-Net alone decides SDXL's step time, so the file is the U-Net-only one bench/_sdxl_unet.py writes (float16,
5.1 GB at full size, tensor by tensor), loaded by each side in the suite's dtype on the suite's device: ours with
``engine.loading.load_unet``, diffusers as ``UNet2DConditionModel`` (SDXL base config) given
``convert_ldm_unet_checkpoint``'s tensors. Both run bench/_sdxl_unet.py's Euler loop (one U-Net call on the CFG pair
per step) from the same noise with the same context, pooled embedding and size ids, so their final latents must
agree. s/step: a synchronised timed loop of ``sdxl_steps`` steps over the steps, after an untimed 2-step warm-up.
"""

from __future__ import annotations

import time

from bench._gpu_suite_common import CFG, SEED, Budget, SuiteConfig, compile_forward, sync

__all__ = ["run_sdxl_section"]

WARMUP_STEPS = 2


class _Side:
    def __init__(self, name: str, unet, eps, cfg: SuiteConfig):
        self.name, self.unet, self.eps, self.cfg = name, unet, eps, cfg

    def compile(self) -> None:
        compile_forward(self.unet, self.cfg.compile_backend)


def _ours(path, device, dtype, inputs, cfg: SuiteConfig) -> _Side:
    import torch

    from engine.checkpoint import open_state_dict
    from engine.families import FAMILIES
    from engine.loading import load_unet
    from engine.unet import sdxl_size_embedding

    sdxl = next(f for f in FAMILIES if f.name == "sdxl")
    unet = load_unet(open_state_dict(path), device, dtype, sdxl)
    unet.eval().requires_grad_(False)
    _, context, pooled, time_ids = inputs
    ctx = context.to(device, dtype)
    y = torch.cat([pooled, sdxl_size_embedding(time_ids)], dim=-1).to(device)  # what engine.pipeline hands the U-Net

    def eps(x, t):
        return unet(x.to(dtype).contiguous(), t.to(device), ctx, y)

    return _Side("ours", unet, eps, cfg)


def _diffusers(unet_cfg: dict, path, device, dtype, inputs, cfg: SuiteConfig) -> _Side:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.utils import logging as dlogging
    from safetensors import safe_open

    from bench._sdxl_unet import UNET_PREFIX, diffusers_sdxl_unet_config

    dlogging.set_verbosity_error()
    config = diffusers_sdxl_unet_config(unet_cfg)
    handle = safe_open(str(path), framework="pt", device="cpu")
    ckpt = {k: handle.get_tensor(k).to(dtype) for k in handle.keys() if k.startswith(UNET_PREFIX)}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    del ckpt
    unet.to(device).eval().requires_grad_(False)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"UNet2DConditionModel: tensors left on the meta device: {left[:5]}")
    _, context, pooled, time_ids = inputs
    ctx = context.to(device, dtype)
    added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}

    def eps(x, t):
        return unet(x.to(dtype).contiguous(), t.to(device), encoder_hidden_states=ctx, added_cond_kwargs=added,
                    return_dict=False)[0]

    return _Side("diffusers", unet, eps, cfg)


def _measure(side: _Side, noise, steps: int, device) -> dict:
    from bench._sdxl_unet import euler_cfg_sample  # the Euler loop both workers of engine_vs_diffusers.py run

    sync(device)
    t = time.perf_counter()
    euler_cfg_sample(side.eps, noise, WARMUP_STEPS, CFG)
    sync(device)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    run = euler_cfg_sample(side.eps, noise, steps, CFG)
    sync(device)
    seconds = time.perf_counter() - t
    return {"s_per_step": seconds / steps, "steps_per_s": steps / seconds, "warmup_s": warm,
            "latents": run["latents"].float().cpu()}


def run_sdxl_section(cfg: SuiteConfig, budget: Budget, shared: dict, log) -> dict:
    import torch

    from bench._gpu_suite_sd15 import _error, _free, latent_agreement
    from bench._sdxl_unet import SDXL_PRESETS, shared_inputs, write_unet_file
    from engine.devices import resolve_dtype

    preset = dict(SDXL_PRESETS[cfg.sdxl_preset], size=cfg.sdxl_size)
    path = cfg.work / f"sdxl-unet-{cfg.sdxl_preset}-fp16.safetensors"
    out: dict = {"preset": cfg.sdxl_preset, "size": cfg.sdxl_size, "steps": cfg.sdxl_steps, "sampler": "Euler",
                 "cfg": CFG, "rows": [], "agreement": []}
    need = cfg.guess["sdxl_eager"]
    if not budget.fits(need):
        out["skipped"] = budget.skip_note("the SDXL U-Net (file, loads, eager runs)", need)
        log(f"  skipped: {out['skipped']}")
        return out
    if cfg.sdxl_preset == "full":
        from engine.random_checkpoint import random_spec
        from engine.unet import UNetConfig

        if UNetConfig(**preset["unet"]) != random_spec("sdxl", "full").unet:
            raise RuntimeError("bench._sdxl_unet.SDXL_PRESETS['full'] no longer matches the SDXL base shapes")
    if not path.exists():
        t = time.perf_counter()
        write_unet_file(preset, path, seed=1234)
        out["write_s"] = time.perf_counter() - t
        log(f"  wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {out['write_s']:.1f} s")
    out["file_bytes"] = path.stat().st_size
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out["dtype"] = str(dtype).removeprefix("torch.")
    inputs = shared_inputs(preset, SEED)
    noise = inputs[0].to(device)
    sides: list[_Side] = []
    for name, make in (("ours", lambda: _ours(path, device, dtype, inputs, cfg)),
                       ("diffusers", lambda: _diffusers(preset["unet"], path, device, dtype, inputs, cfg))):
        try:
            t = time.perf_counter()
            sides.append(make())
            out[f"{name}_load_s"] = time.perf_counter() - t
        except Exception as exc:
            out[f"{name}_error"] = _error(exc)
            log(f"  {name}: could not set up: {out[f'{name}_error']}")
    step_s: dict[str, float] = {}
    for mode in ("eager", "compiled"):
        # Both sides or neither (a comparison needs the pair): their runs at the step time measured eager, plus a
        # compile each (the guess) when compiled.
        need = sum((WARMUP_STEPS + cfg.sdxl_steps) * step_s.get(side.name, 0.0)
                   + (cfg.guess["sdxl_compile"] if mode == "compiled" else 0.0) for side in sides)
        if not budget.fits(need):
            note = budget.skip_note(f"{mode} ({' + '.join(side.name for side in sides)})", need)
            out["rows"] += [{"side": side.name, "mode": mode, "skipped": note} for side in sides]
            log(f"  {mode}: skipped: {note}")
            continue
        latents = {}
        for side in sides:
            row: dict = {"side": side.name, "mode": mode}
            try:
                if mode == "compiled":
                    side.compile()
                numbers = _measure(side, noise, cfg.sdxl_steps, device)
                latents[side.name] = numbers.pop("latents")
                row.update(numbers)
                step_s.setdefault(side.name, row["s_per_step"])
                log(f"  {side.name:9s} {mode:8s}: {row['s_per_step'] * 1e3:8.2f} ms/step (warm-up {row['warmup_s']:.1f} s)")
            except Exception as exc:
                row["error"] = _error(exc)
                log(f"  {side.name:9s} {mode:8s}: FAILED {row['error']}")
                _free(device)
            out["rows"].append(row)
        if len(latents) == 2:
            agree = {"mode": mode, **latent_agreement(latents["ours"], latents["diffusers"])}
            out["agreement"].append(agree)
            log(f"  final latents, {mode}: max|ours - diffusers| = {agree['max_abs_latent_diff']:.3g} "
                f"(relative {agree['relative']:.2e})")
    sides.clear()
    _free(device, compiled=True)
    return out

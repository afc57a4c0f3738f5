"""Throughput and model FLOP utilisation of our engine against diffusers, same device, same weights, same run.

How to run (from the repository root)::

    .venv/bin/python bench/gpu_throughput.py                 # CUDA: SD 1.5 shapes, 512x512, 25 steps,
                                                             # float16 + bfloat16, batch 1/4/8/16
    .venv/bin/python bench/gpu_throughput.py --dtypes bf16 --batches 8 --variants eager,compile+cudagraphs
    .venv/bin/python bench/gpu_throughput.py --cpu           # the small CPU config (what runs without CUDA)
    .venv/bin/python bench/gpu_throughput.py --family sdxl   # CUDA: SDXL base shapes, 1024x1024, 25 steps,
                                                             # float16 + bfloat16, batch 1/2/4/8 (the first run
                                                             # writes a 6.9 GB float16 checkpoint: a few minutes,
                                                             # ~20 GB of host RAM)
    .venv/bin/python bench/gpu_throughput.py --family sdxl --cpu   # SDXL's tiny preset on the CPU (smoke run)

Without CUDA it says so and runs a small config on the CPU instead: the same topology with narrow widths
(``small`` in bench/_sd15_random.py), 128x128, 4 steps, float32, batch 1/2, variants eager and
channels_last (``--variants`` adds compile; it takes minutes to compile on a small CPU).

``--family sdxl``: the same measurement for SDXL base. The checkpoint is
``engine.random_checkpoint.write_random(family="sdxl", preset="full", dtype=float16)`` (U-Net, CLIP-L, bigG, VAE;
``preset="tiny"``, float32, on the CPU), at 1024x1024 by default, batch 1/2/4/8. Both sides get the same fixed
context (2 x 77 x 2048) and pooled embedding (2 x 1280); the size conditioning is each side's own default
(original = target = the image size, no crop). diffusers runs ``StableDiffusionXLPipeline`` (no text encoders,
``add_watermarker=False``, its SDXL VAE config's ``force_upcast``: the decode runs in float32, as shipped); ours
decodes as it ships (float32 fallback on NaNs is noted). The FLOP per image is counted the same way, with the
U-Net given its ``y``.

What is measured
----------------
Both sides render ``batch`` images of ``size`` x ``size`` with ``DPM++ 2M Karras``, ``steps`` steps, CFG 7 (cond and
uncond in one U-Net batch) and a VAE decode to PIL images, from the same random-weight checkpoint (written once
under bench/_work/, float32, converted for diffusers with its own ``convert_ldm_*_checkpoint``), on the same device
in the same dtype. Neither side runs a text encoder: both get the same fixed (cond, uncond) embeddings.

* **ours**: ``engine.pipeline.Pipeline.generate`` (its ``_conditioning`` returns the fixed embeddings). Variants:
  ``eager`` (as shipped: PyTorch SDPA attention), ``flash`` (SDPA limited to the flash and math kernels),
  ``channels_last`` (U-Net and VAE in channels-last memory format), ``compile`` (``torch.compile`` of the U-Net),
  ``channels_last+compile``, ``compile+cudagraphs`` (``mode="reduce-overhead"``: CUDA graphs).
* **diffusers**: ``StableDiffusionPipeline`` (diffusers 0.42.1, eager, its default attention processor) with
  ``prompt_embeds`` / ``negative_prompt_embeds``, ``DPMSolverMultistepScheduler(use_karras_sigmas=True)``.

Each configuration runs ``--warmup`` times untimed (compilation, CUDA graph capture, allocator warm-up), then
``--repeat`` times; the best run counts. images/s = batch / seconds. Model FLOP utilisation = images/s x FLOP per
image / peak FLOP/s, where FLOP per image = steps x (one CFG U-Net call on one image) + one VAE decode, counted
here with ``torch.utils.flop_counter.FlopCounterMode`` (SD 1.5 at 512x512: 1.607 TFLOP and 2.51 TFLOP; see
../shared/DESIGN.md). Two peaks: the device's dense fp16/bf16 tensor-core figure from its data sheet (a table by
GPU name, or ``--peak-tflops``), and a ``matmul`` peak measured here on this device in this dtype
(``--matmul-size`` square matmuls), which is also the CPU's reference. Targets on one H100: ours >= 1.5x
diffusers' eager throughput and >= 40 % MFU at batch 8 and up.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The model presets, the checkpoint writer and the diffusers loading, shared with bench/engine_vs_diffusers.py.
from bench._diffusers_reference import load_diffusers_sdxl_models, sd15_pipeline  # noqa: E402
from bench._sd15_random import PRESETS, make_checkpoint  # noqa: E402
from bench._sdxl_unet import SIZE_FEATURES, unet_dict  # noqa: E402

SAMPLER = "DPM++ 2M Karras"
CFG = 7.0
# Dense (no sparsity) fp16/bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}
VARIANTS = ("eager", "flash", "channels_last", "compile", "channels_last+compile", "compile+cudagraphs")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no data-sheet peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"data sheet ({name})"
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


def _matmul_tflops(device, dtype, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


# ------------------------------------------------------------------------------------------------ the two sides


class Ours:
    def __init__(self, path: Path, device, dtype, cond, variant: str, pooled=None):
        import torch

        from engine.pipeline import Pipeline
        from engine.unet import sdxl_size_embedding

        self.pipe = Pipeline.load(path, device=str(device), dtype={torch.float16: "float16", torch.bfloat16: "bfloat16",
                                                                   torch.float32: "float32"}[dtype])
        self.device, self.dtype, self.cond, self.variant = device, dtype, cond, variant
        models = self.pipe.models
        parts = set(variant.split("+"))
        if "channels_last" in parts:
            models.unet.to(memory_format=torch.channels_last)
            models.vae.to(memory_format=torch.channels_last)
        if "compile" in parts:
            mode = "reduce-overhead" if "cudagraphs" in parts else None
            models.unet = torch.compile(models.unet, mode=mode, fullgraph=False)
        self.vae_dtype = models.vae.dtype

        def conditioning(reqs):  # the fixed embeddings, cond rows then uncond rows, as the pipeline orders them
            b = len(reqs)
            context = torch.cat([self.cond[0:1].expand(b, -1, -1), self.cond[1:2].expand(b, -1, -1)]).to(device, dtype)
            if pooled is None:
                return context, None  # no SDXL y for SD 1.5
            # SDXL's y as the pipeline builds it: pooled text, then (original = target = request size, no crop).
            sizes = torch.tensor([[r.height, r.width, 0, 0, r.height, r.width] for r in reqs] * 2, dtype=torch.float32)
            rows = torch.cat([pooled[0:1].expand(b, -1), pooled[1:2].expand(b, -1)])
            return context, torch.cat([rows, sdxl_size_embedding(sizes)], dim=-1).to(device)

        self.pipe._conditioning = conditioning  # type: ignore[method-assign]

    def run(self, batch: int, size: int, steps: int) -> list:
        import contextlib

        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from engine.pipeline import GenerationRequest

        self.pipe.max_batch_size = batch
        reqs = [GenerationRequest("bench", seed=1000 + i, width=size, height=size, steps=steps, cfg_scale=CFG, sampler=SAMPLER)
                for i in range(batch)]
        # flash: the flash kernel wherever its constraints hold, else the math kernel (not memory-efficient / cuDNN).
        ctx = (sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]) if self.variant == "flash"
               else contextlib.nullcontext())
        with ctx, torch.inference_mode():
            return [r.image for r in self.pipe.generate(reqs)]

    def fell_back_to_float32(self) -> bool:
        return self.pipe.models.vae.dtype != self.vae_dtype


class Diffusers:
    def __init__(self, preset: dict, path: Path, device, dtype, cond):
        self.pipe, _, _ = sd15_pipeline(path, preset, device, dtype)
        self.device, self.dtype, self.cond = device, dtype, cond

    def run(self, batch: int, size: int, steps: int) -> list:
        import torch

        cond = self.cond[0:1].expand(batch, -1, -1).to(self.device, self.dtype)
        uncond = self.cond[1:2].expand(batch, -1, -1).to(self.device, self.dtype)
        generator = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(batch)]
        with torch.inference_mode():
            return self.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size,
                             num_inference_steps=steps, guidance_scale=CFG, generator=generator, output_type="pil").images


class DiffusersXL:
    """``StableDiffusionXLPipeline`` with no text encoders: it takes the fixed embeddings and pooled vectors."""

    def __init__(self, preset: dict, path: Path, device, dtype, cond, pooled):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        unet, vae = load_diffusers_sdxl_models(path, preset["unet"], preset["vae"], preset["size"], preset["vae"]["scaling_factor"])
        unet.to(device, dtype).eval().requires_grad_(False)
        vae.to(device, dtype).eval().requires_grad_(False)
        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2,
                                            use_karras_sigmas=True)
        self.pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                              tokenizer_2=None, unet=unet, scheduler=sched, add_watermarker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.dtype, self.cond, self.pooled = device, dtype, cond, pooled

    def run(self, batch: int, size: int, steps: int) -> list:
        import torch

        def rows(t, i):
            return t[i : i + 1].expand(batch, *t.shape[1:]).to(self.device, self.dtype)

        generator = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(batch)]
        with torch.inference_mode():
            return self.pipe(prompt_embeds=rows(self.cond, 0), negative_prompt_embeds=rows(self.cond, 1),
                             pooled_prompt_embeds=rows(self.pooled, 0), negative_pooled_prompt_embeds=rows(self.pooled, 1),
                             height=size, width=size, num_inference_steps=steps, guidance_scale=CFG,
                             generator=generator, output_type="pil").images


# ------------------------------------------------------------------------------------------------ measuring


def _flop_per_image(path: Path, device, dtype, size: int, steps: int, context_dim: int) -> tuple[float, float, float]:
    """(U-Net CFG call, VAE decode, whole image) FLOP for one image, counted by torch's FlopCounterMode (an SDXL
    U-Net also gets its ``y``: the vector conditioning's two small Linear layers count too)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.loading import load_checkpoint

    models = load_checkpoint(path, device=device, dtype=dtype)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.randn(2, 77, context_dim, device=device, dtype=dtype)
    adm = models.unet.config.adm_in_channels
    y = None if adm is None else torch.randn(2, adm, device=device, dtype=dtype)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as unet_count:
            models.unet(x, t, ctx, y)
        with FlopCounterMode(display=False) as vae_count:
            models.vae.decode_latents(x[:1])
    unet, vae = float(unet_count.get_total_flops()), float(vae_count.get_total_flops())
    del models
    return unet, vae, steps * unet + vae


def _time(side, batch: int, size: int, steps: int, warmup: int, repeat: int, device) -> float:
    for _ in range(warmup):
        side.run(batch, size, steps)
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        images = side.run(batch, size, steps)
        _sync(device)
        best = min(best, time.perf_counter() - t)
        assert len(images) == batch
    return best


def _sdxl_preset(which: str, size: int) -> dict:
    """SDXL base ("full", float16 file) or its tiny preset (float32 file): this script's preset dict, from
    engine.random_checkpoint's spec (U-Net as bench._sdxl_unet's plain dict, VAE as VAEConfig's fields)."""
    import dataclasses

    import torch

    from engine.random_checkpoint import random_spec

    spec = random_spec("sdxl", which)
    dtype = torch.float16 if which == "full" else torch.float32
    return {"unet": unet_dict(spec.unet), "vae": dataclasses.asdict(spec.vae), "size": size, "preset": which,
            "file_dtype": dtype, "file": f"sdxl-{which}-random-{str(dtype).removeprefix('torch.')}.safetensors"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the small CPU config even when CUDA is there")
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15", help="SD 1.5 (512x512) or SDXL base (1024x1024)")
    p.add_argument("--dtypes", default=None, help="comma-separated: fp16, bf16, fp32 (default fp16,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes (default 1,4,8,16 on CUDA, SDXL 1,2,4,8; 1,2 on CPU)")
    p.add_argument("--variants", default=None, help=f"ours: comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25 on CUDA, 4 on CPU)")
    p.add_argument("--size", type=int, default=None, help="image size (default 512 on CUDA, SDXL 1024; 128 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per configuration (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per configuration, best counts (default 3 / 2)")
    p.add_argument("--no-diffusers", action="store_true", help="ours only")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for MFU (default: data sheet)")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul for the measured peak (8192 CUDA, 1024 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    import warnings

    import torch

    # diffusers warns that a scheduler config built by hand has steps_offset=0; it changes nothing measured here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("ADFORGE_CACHE_DIR", str(WORK / "cache"))
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda:0" if cuda else "cpu")
    sdxl = args.family == "sdxl"
    if cuda:
        preset = _sdxl_preset("full", args.size or 1024) if sdxl else dict(PRESETS["full"], size=args.size or 512)
        dtypes = args.dtypes or "fp16,bf16"
        batches = args.batches or ("1,2,4,8" if sdxl else "1,4,8,16")
        variants = args.variants or ",".join(VARIANTS)
        steps = args.steps or 25
        warmup, repeat = args.warmup if args.warmup is not None else 2, args.repeat or 3
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        preset = _sdxl_preset("tiny", args.size or 128) if sdxl else dict(PRESETS["small"], size=args.size or 128)
        dtypes = args.dtypes or "fp32"
        batches = args.batches or "1,2"
        variants = args.variants or "eager,channels_last"
        steps = args.steps or 4
        warmup, repeat = args.warmup if args.warmup is not None else 1, args.repeat or 2
        why = "--cpu given" if torch.cuda.is_available() else "no CUDA device on this machine"
        name = "SDXL" if sdxl else "SD 1.5"
        print(f"device: CPU ({why}): a SMALL config, not {name}: narrow widths of the {name} topology, "
              f"{preset['size']}x{preset['size']}, {steps} steps, {torch.get_num_threads()} thread(s). The FLOP counts and MFU "
              f"below are this small model's; the data-sheet targets are for {name} on an H100.")
    size = preset["size"]
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    dtype_list = [names[d.strip()] for d in dtypes.split(",")]
    batch_list = [int(b) for b in batches.split(",")]
    variant_list = [v.strip() for v in variants.split(",")]
    for v in variant_list:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        if "cudagraphs" in v and not cuda:
            p.error("compile+cudagraphs needs CUDA")

    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / preset["file"]
    if not path.exists():
        print(f"writing the random-weight checkpoint {path} (once) ...", flush=True)
        if sdxl:
            from engine.random_checkpoint import write_random

            write_random(path, family="sdxl", preset=preset["preset"], seed=1234, dtype=preset["file_dtype"])
        else:
            make_checkpoint(preset, path, seed=1234)
    gen = torch.Generator("cpu").manual_seed(7)
    cond = torch.randn(2, 77, preset["unet"]["context_dim"], generator=gen)
    pooled = torch.randn(2, preset["unet"]["adm_in_channels"] - SIZE_FEATURES, generator=gen) if sdxl else None
    peak, peak_source = _peak_tflops(device, args.peak_tflops)

    rows: list[tuple] = []
    for dtype in dtype_list:
        dname = str(dtype).removeprefix("torch.")
        unet_flop, vae_flop, image_flop = _flop_per_image(path, device, dtype, size, steps, preset["unet"]["context_dim"])
        matmul = _matmul_tflops(device, dtype, args.matmul_size or (8192 if cuda else 1024))
        print(f"\n{dname}: FLOP per image {image_flop / 1e12:.4g} T = {steps} x {unet_flop / 1e12:.4g} T (CFG U-Net call) + "
              f"{vae_flop / 1e12:.4g} T (VAE decode); matmul peak measured here {matmul:.3g} TFLOP/s; "
              f"data-sheet peak {f'{peak:.0f} TFLOP/s' if peak else 'n/a'} ({peak_source})", flush=True)
        sides: list[tuple[str, object]] = []
        if not args.no_diffusers:
            sides.append(("diffusers eager", lambda: DiffusersXL(preset, path, device, dtype, cond, pooled) if sdxl
                          else Diffusers(preset, path, device, dtype, cond)))
        for variant in variant_list:
            sides.append((f"ours {variant}", lambda v=variant: Ours(path, device, dtype, cond, v, pooled)))
        for label, make in sides:
            try:
                side = make()
            except Exception as exc:  # e.g. no C++ compiler for torch.compile on this machine
                print(f"  {label}: could not set up: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            for batch in batch_list:
                try:
                    seconds = _time(side, batch, size, steps, warmup, repeat, device)
                except torch.OutOfMemoryError:
                    print(f"  {label:<28} batch {batch:>2}: out of memory")
                    torch.cuda.empty_cache() if cuda else None
                    continue
                except Exception as exc:
                    print(f"  {label:<28} batch {batch:>2}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                ips = batch / seconds
                achieved = ips * image_flop / 1e12
                note = " (VAE fell back to float32: NaNs)" if isinstance(side, Ours) and side.fell_back_to_float32() else ""
                rows.append((dname, batch, label, ips, achieved, matmul))
                print(f"  {label:<28} batch {batch:>2}: {ips:8.3f} images/s  {seconds / batch:8.4f} s/image  "
                      f"{achieved:8.3g} TFLOP/s  MFU {f'{achieved / peak:6.1%}' if peak else '   n/a'} "
                      f"(vs matmul {achieved / matmul:6.1%}){note}", flush=True)
            del side
            if cuda:
                torch.cuda.empty_cache()

    print(f"\nratios ({'SDXL' if sdxl else 'SD 1.5'}, {size}x{size}): ours / diffusers eager, same dtype and batch (target >= 1.5 on an H100 at batch 8+)")
    reference = {(d, b): ips for d, b, label, ips, _, _ in rows if label == "diffusers eager"}
    for d, b, label, ips, achieved, matmul in rows:
        if label.startswith("ours") and (d, b) in reference:
            mfu = f"MFU {achieved / peak:6.1%}" if peak else f"MFU vs matmul {achieved / matmul:6.1%}"
            print(f"  {d:<9} batch {b:>2}  {label:<28} {ips / reference[(d, b)]:6.2f}x   {mfu}")


if __name__ == "__main__":
    main()

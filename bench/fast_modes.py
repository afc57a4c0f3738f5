"""What each fast mode and dtype costs in quality and buys in speed, on the bundled demo model (real pictures).

Run from the repository root::

    .venv/bin/python bench/fast_modes.py                   # 64 + 64 scenes per variant, ~10 min on 2 cores
    .venv/bin/python bench/fast_modes.py --n 8 --steps 6   # smoke run
    .venv/bin/python bench/fast_modes.py --variants float32,bfloat16+cache:3 --n 128

Each variant is ``DTYPE[+FAST...]`` (``float32+cache:3+tome:0.5`` = float32 with ``--fast cache:3,tome:0.5``); the
first is the reference (default: float32, the exact computation). Every variant renders the same one-object
scenes with the same seeds (bench/demo_adherence.py's captions: trained combinations and held-out ones) with
25-step DPM++ 2M Karras at the model's native size, and the table gives, side by side:

* seconds per image (after a warm-up render, batch of all scenes) and the speed-up against the reference;
* PSNR and SSIM of each picture against the reference's picture of the same seed (mean over the scenes; min PSNR);
* the adherence bench's shares scored right (background, object colour, shape, position), trained and held-out
  scenes pooled, with their 95 % sampling error printed once.

On the bundled 128-px model the U-Net is small, so per-call overheads weigh more than on SD 1.5; the speed-ups at
SD 1.5 shapes come from bench/engine_vs_diffusers.py. The load average is printed: trust only quiet runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._image_quality import psnr, ssim, to_tensor  # noqa: E402
from bench.demo_adherence import ATTRIBUTES, scenes  # noqa: E402

DEFAULT_VARIANTS = "float32,bfloat16,float32+cache:2,float32+cache:3,float32+tome:0.5,float32+cache:3+tome:0.5"


def parse_variant(spec: str) -> tuple[str, str]:
    dtype, _, fast = spec.strip().partition("+")
    return dtype, fast.replace("+", ",")


def render(pipe, items, fast: str, steps: int, cfg: float, seed: int):
    from engine.pipeline import GenerationRequest

    size = pipe.models.native_size
    requests = [GenerationRequest(s.caption, seed=seed + i, width=size, height=size, steps=steps, cfg_scale=cfg,
                                  sampler="DPM++ 2M Karras", fast=fast) for i, s in enumerate(items)]
    pipe.generate(requests[:1])  # warm-up: first-touch of weights, allocator, kernels
    t = time.perf_counter()
    results = pipe.generate(requests)
    return (time.perf_counter() - t) / len(requests), [r.image for r in results]


def measure(args) -> list[dict]:
    from demo.evaluate import score_image
    from engine.pipeline import Pipeline

    items = scenes(args.seed, args.n, False) + scenes(args.seed + 1, args.n, True)
    pipes: dict[str, Pipeline] = {}
    rows: list[dict] = []
    reference: list | None = None
    for spec in args.variants.split(","):
        dtype, fast = parse_variant(spec)
        if dtype not in pipes:
            pipes[dtype] = Pipeline.load(args.model, device="cpu", dtype=dtype, max_batch_size=16)
        seconds, images = render(pipes[dtype], items, fast, args.steps, args.cfg, args.seed)
        tensors = [to_tensor(im) for im in images]
        if reference is None:
            reference = tensors
        scores = [score_image(im, scene) for im, scene in zip(images, items)]
        ps = [psnr(a, b) for a, b in zip(tensors, reference)]
        finite = [p for p in ps if math.isfinite(p)]
        rows.append({
            "variant": f"{dtype}" + (f" + {fast}" if fast else ""),
            "s_per_image": seconds,
            "psnr_mean": sum(finite) / len(finite) if finite else math.inf,
            "psnr_min": min(ps),
            "identical": sum(not math.isfinite(p) for p in ps),
            "ssim": sum(ssim(a, b) for a, b in zip(tensors, reference)) / len(tensors),
            **{a: sum(bool(getattr(s, a)) for s in scores) / len(scores) for a in ATTRIBUTES},
        })
        print(f"  {rows[-1]['variant']}: {seconds:.3f} s/image", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    from engine.bundled import bundled_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model_path())
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated DTYPE[+FAST...]; the first is the reference")
    ap.add_argument("--n", type=int, default=64, help="scenes per set (trained and held-out combinations)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        ap.error("--n and --steps must be at least 1")
    import torch

    load = os.getloadavg()
    print(f"model {args.model.name}, {args.steps}-step DPM++ 2M Karras, CFG {args.cfg:g}, {2 * args.n} scenes per variant, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    if load[0] > 0.5 * (os.cpu_count() or 1):
        print("WARNING: the machine is busy: speed-ups are inflated or deflated by other work", flush=True)
    rows = measure(args)
    ref = rows[0]
    print("\n| variant | s/image | speed-up | PSNR dB mean (min) | SSIM | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(ATTRIBUTES))
    for r in rows:
        quality = "exact" if r["identical"] == 2 * args.n else f"{r['psnr_mean']:.1f} ({r['psnr_min']:.1f})"
        print(f"| {r['variant']} | {r['s_per_image']:.3f} | {ref['s_per_image'] / r['s_per_image']:.2f}x | {quality} | "
              f"{r['ssim']:.4f} | " + " | ".join(f"{r[a]:.1%}" for a in ATTRIBUTES) + " |")
    n = 2 * args.n
    print(f"\nsampling error of a share (95 %, n = {n}): +-{196 * math.sqrt(0.25 / n):.1f} points at most; "
          f"load average after {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()

"""Peak memory and time of upscaling, tiled against untiled, each case in a subprocess of its own.

Cases (on the CPU unless ``--device``):

* ``model-untiled``: a 4x ESRGAN (random weights, RRDBNet layout; ``--nf`` filters, ``--blocks`` RRDBs) on a
  1024 x 1024 image in one piece (``tile=0``) -> 4096 x 4096;
* ``model-tiled``: the same with the default tiling (512 px input tiles, 32 px feathered overlap);
* ``hires-tiled`` (``--hires``): the hires fix of the tiny random SD1 checkpoint from 512 x 512 to 4096 x 4096
  (latent upscale x8, 4 steps at denoise 0.5, 512 px tiles for the denoiser and the VAE).

Peak memory is the child process's resident-set high-water mark (``getrusage`` ``ru_maxrss``): tracemalloc cannot
see torch's allocations. Each case reports its peak and its *own* peak, above the RSS it had once the model and
input were ready (torch alone holds a few hundred MB). The parent prints ratios of the untiled run to the
tiled one, measured in this invocation on this machine.

    .venv/bin/python bench/upscale.py                      # model cases
    .venv/bin/python bench/upscale.py --hires              # and the 4096 x 4096 hires fix (slow on a CPU)
    .venv/bin/python bench/upscale.py --cases hires-tiled  # only that
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(case: str, args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if case.startswith("model"):
        from engine.upscale.networks import load_upscaler
        from engine.upscale.random_models import random_esrgan, write_upscaler

        path = work / f"esrgan-nf{args.nf}-nb{args.blocks}.safetensors"
        if not path.exists():
            write_upscaler(random_esrgan(num_filters=args.nf, num_blocks=args.blocks, scale=4, seed=0), path)
        up = load_upscaler(path, device=args.device)
        x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        tiles = []
        base = _maxrss_mb()
        t0 = time.perf_counter()
        out = up.upscale_tensor(x, tile=0 if case == "model-untiled" else None, progress=lambda d, t: tiles.append(t))
        seconds = time.perf_counter() - t0
        shape = list(out.shape)
        return {"case": case, "seconds": seconds, "peak_mb": _maxrss_mb(), "base_mb": base, "output": shape[2:][::-1],
                "tiles": tiles[-1] if tiles else 1, "checksum": float(out[0, :, ::97, ::89].double().mean())}
    if case == "hires-tiled":
        from engine.pipeline import GenerationRequest, Pipeline
        from engine.random_checkpoint import write_random_sd1
        from engine.upscale.chain import Hires
        from engine.upscale.hires import hires_fix

        ckpt = work / "tiny-sd1.safetensors"
        if not ckpt.exists():
            write_random_sd1(ckpt, seed=0)
        pipe = Pipeline.load(ckpt, device=args.device, dtype="float32")
        req = GenerationRequest("a lighthouse at dusk", seed=1, width=512, height=512, steps=4)
        first = pipe.generate([req])
        base = _maxrss_mb()
        t0 = time.perf_counter()
        [out] = hires_fix(pipe, first, Hires(scale=8, denoise=0.5, steps=4, tile=512))
        seconds = time.perf_counter() - t0
        return {"case": case, "seconds": seconds, "peak_mb": _maxrss_mb(), "base_mb": base, "output": list(out.image.size),
                "tiles": None, "checksum": None}
    raise SystemExit(f"unknown case {case}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="input side in pixels (default 1024 -> 4096 output)")
    ap.add_argument("--nf", type=int, default=16, help="ESRGAN filters (RealESRGAN_x4plus has 64)")
    ap.add_argument("--blocks", type=int, default=1, help="ESRGAN RRDB blocks (RealESRGAN_x4plus has 23)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hires", action="store_true", help="also the hires fix to 4096 x 4096")
    ap.add_argument("--cases", help="comma-separated cases to run instead (model-untiled, model-tiled, hires-tiled)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # a child run
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args, Path(args.work))))
        return

    cases = ["model-untiled", "model-tiled"] + (["hires-tiled"] if args.hires else [])
    if args.cases:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="adforge-bench-upscale-") as work:
        for case in cases:
            cmd = [sys.executable, __file__, "--case", case, "--work", work, "--size", str(args.size), "--nf", str(args.nf),
                   "--blocks", str(args.blocks), "--threads", str(args.threads), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
            if proc.returncode != 0:
                print(f"{case}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[case] = r
            own = r["peak_mb"] - r["base_mb"]
            print(f"{case:14s} {r['output'][0]}x{r['output'][1]}  {r['seconds']:7.1f} s  peak RSS {r['peak_mb']:7.0f} MB  "
                  f"(own {own:6.0f} MB above {r['base_mb']:.0f} MB)" + (f"  {r['tiles']} tiles" if r.get("tiles") else ""))
    if "model-untiled" in results and "model-tiled" in results:
        u, t = results["model-untiled"], results["model-tiled"]
        print(f"ESRGAN nf={args.nf} blocks={args.blocks}, {args.size}x{args.size} -> {4 * args.size}x{4 * args.size}, "
              f"{args.threads} thread(s) on {args.device}:")
        print(f"  peak RSS untiled / tiled = {u['peak_mb'] / t['peak_mb']:.2f}x  "
              f"(own peak above the loaded state: {(u['peak_mb'] - u['base_mb']) / max(1.0, t['peak_mb'] - t['base_mb']):.2f}x)")
        print(f"  time tiled / untiled     = {t['seconds'] / u['seconds']:.2f}x")


if __name__ == "__main__":
    main()

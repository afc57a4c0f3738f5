"""Load memory: peak resident memory while ``engine.loading.load_checkpoint`` builds a full-size single file.

What it measures. A full-size random checkpoint (default: SDXL base in float16, ~6.9 GB) is written once with
``engine.random_checkpoint.write_random`` (streamed, so writing it costs about one U-Net of memory) and cached under
``bench/_work/`` (git-ignored). Then, for each load dtype, a fresh Python process imports the engine, records its
resident memory (the baseline), resets the kernel's high-water mark (``/proc/self/clear_refs``, where allowed), runs
``load_checkpoint(path, device="cpu", dtype=...)`` (the file's sha256 included: the hash cache points at a fresh
temporary folder) and reads the peak (``VmHWM`` in ``/proc/self/status``). Printed per load: file size, peak RSS,
peak minus baseline, both as ratios of the file size, the load time and the load average (``os.getloadavg()``).

The target (the issue "single files stay memory-mapped"): a float16 load of a float16 file peaks under 1.2x the
file's size. Loading in the file's own dtype should alias the memory-mapped tensors, so its pages count only once
touched. The float32 load of the same file is a conversion (new float32 tensors, twice the file) and is printed for
information only.

Usage::

    flock /tmp/adforge-bigmem.lock .venv/bin/python bench/load_memory.py [--family sdxl|sd2|sd1] [--dtypes float16,float32]

(writing and converting take several GB; ``flock`` keeps two such jobs from running at once). The child mode
``--measure FILE --dtype float16`` prints one JSON line; tests/engine/test_load_memory.py uses it on a small file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "_work"
TARGET_RATIO = 1.2
DTYPES = ("float16", "float32", "bfloat16")


def _status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the load's and not the imports'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(path: str, dtype_name: str) -> dict[str, float | int | bool]:
    """In this (fresh) process: load ``path`` on the CPU in ``dtype_name`` and report memory in bytes."""
    import torch

    from engine.loading import load_checkpoint

    dtype = getattr(torch, dtype_name)
    baseline = _status_kb("VmRSS") * 1024
    reset = _reset_peak()
    start = time.perf_counter()
    models = load_checkpoint(path, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") * 1024
    size = os.path.getsize(path)
    params = sum(p.numel() for m in (models.unet, models.text_encoder, models.text_encoder_2, models.vae)
                 if m is not None for p in m.parameters())
    return {"file_bytes": size, "baseline_bytes": baseline, "peak_bytes": peak, "growth_bytes": peak - baseline,
            "peak_ratio": peak / size, "growth_ratio": (peak - baseline) / size, "load_s": seconds,
            "loadavg_1m": os.getloadavg()[0], "peak_reset": reset, "parameters": params}


def measure_in_subprocess(path: str | os.PathLike[str], dtype_name: str) -> dict[str, float | int | bool]:
    """:func:`measure` in a fresh interpreter (its peak is nobody else's), with an empty hash cache so that the
    load hashes the file as a first load does."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ADFORGE_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(path), "--dtype", dtype_name],
                             env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {path} ({dtype_name}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _ensure_file(family: str) -> Path:
    """The cached full-size float16 file of ``family``, written on first use."""
    import torch

    from engine.random_checkpoint import write_random

    path = WORK / f"load-memory-{family}-full-f16.safetensors"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) ...", flush=True)
        start = time.perf_counter()
        write_random(path, family, "full", dtype=torch.float16)
        print(f"  {_gb(path.stat().st_size)} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sdxl", choices=("sdxl", "sd2", "sd1"))
    ap.add_argument("--dtypes", default="float16,float32", help="load dtypes, comma-separated (float16 first)")
    ap.add_argument("--measure", metavar="FILE", help=argparse.SUPPRESS)  # child mode: one load, one JSON line
    ap.add_argument("--dtype", default="float16", choices=DTYPES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.dtype)))
        return 0
    path = _ensure_file(args.family)
    print(f"file {path.name}: {_gb(path.stat().st_size)}; CPUs {os.cpu_count()}")
    failed = False
    for dtype_name in args.dtypes.split(","):
        r = measure_in_subprocess(path, dtype_name)
        target = dtype_name == "float16"  # the file's own dtype: the bound applies; other dtypes convert
        verdict = ("PASS" if r["peak_ratio"] < TARGET_RATIO else "FAIL") if target else "info (conversion)"
        failed |= target and r["peak_ratio"] >= TARGET_RATIO
        print(f"load as {dtype_name}: peak RSS {_gb(r['peak_bytes'])} ({r['peak_ratio']:.3f}x file), baseline "
              f"{_gb(r['baseline_bytes'])}, peak - baseline {_gb(r['growth_bytes'])} ({r['growth_ratio']:.3f}x file); "
              f"load {r['load_s']:.1f} s, load average {r['loadavg_1m']:.2f}; {r['parameters'] / 1e9:.2f} B parameters"
              f"{'' if r['peak_reset'] else ' (peak not reset after imports)'} -> {verdict} "
              f"(target peak < {TARGET_RATIO}x file for the file's own dtype)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

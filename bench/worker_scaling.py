"""Render workers on the CPU: throughput against the number of worker processes (flows/device_pool.py).

How to run (from the repository root)::

    .venv/bin/python bench/worker_scaling.py                       # 1, 2, 4 workers, 24 images, ~1 min
    .venv/bin/python bench/worker_scaling.py --workers 1,2,3,4,6,8 --images 96
    .venv/bin/python bench/worker_scaling.py --no-overlap          # each worker one unit at a time

A small config on purpose: the tiny random model in the SD 1.x layout (engine/random_checkpoint.py, 64x64,
``--steps`` 8, batches of 2), so that what is measured is the pool (hand-out, worker processes, each loading the
model once) plus the real per-image path (engine, post-process, encode, store, record in SQLite), not one large
matrix product. Each worker gets ``--threads`` torch threads (default 1), so N workers want N cores. Workers render
unit k+1 while unit k is delivered (``PoolConfig.overlap``) unless ``--no-overlap``.

For each N: a fresh database and folder store, the brief planned, a pool of N CPU workers started and warmed (one
batch each, not timed: process start and model load are a per-run cost, reported separately), then every batch
of the run timed. The reference is the single-process path in this process (``render_variants`` on one pipeline,
same threads): the ratios are images/s against it, and against 1 worker. On a machine with fewer free cores than
workers the curve flattens where the cores run out; the load average is printed to tell.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _brief(folder: Path, images: int, tag: str) -> Path:
    rows = max(1, images // 4)
    path = folder / f"{tag}.csv"
    path.write_text("campaign,row_id,subject,channels,variants\n" + "".join(
        f"scaling-{tag},row-{i},a shape number {i},instagram_square,{images // rows + (1 if i < images % rows else 0)}\n"
        for i in range(rows)))
    return path


def plan_runs(folder: Path, model: Path, runs: list[tuple[str, int]], steps: int, batch_size: int):
    """One database and store in ``folder``; each (tag, images) brief planned there as a run. Returns the settings
    and, per run, its id and engine-batch units."""
    from flows.campaign import close_resources, plan_run, validate_brief
    from flows.settings import load_settings
    from storage.database import sqlite_url

    folder.mkdir()
    settings = load_settings({"db_url": sqlite_url(folder / "adforge.db"), "store_url": str(folder / "assets"),
                              "model": str(model), "steps": steps, "batch_size": batch_size})
    planned = []
    for tag, images in runs:
        run = plan_run.fn(validate_brief.fn(str(_brief(folder, images, tag)), False, None), settings, False, None)
        planned.append((run.run_id, [b[i : i + batch_size] for b in run.batches for i in range(0, len(b), batch_size)]))
    close_resources()
    return settings, planned


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    p.add_argument("--images", type=int, default=24, help="images per timed run")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (and for the reference)")
    p.add_argument("--no-overlap", action="store_true", help="workers deliver each unit before rendering the next")
    args = p.parse_args(argv)

    import torch

    from engine.random_checkpoint import write_random_sd1
    from flows.device_pool import DevicePool, PoolConfig, plan_workers, wait_until_ready
    from flows.rendering import get_pipeline, load_jobs, render_variants
    from storage.assets import open_store
    from storage.database import open_database

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ADFORGE_CACHE_DIR", str(WORK / "cache"))
    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "scaling-tiny.safetensors"
    if not model.exists():
        write_random_sd1(model, seed=5, metadata={"adforge.native_size": "64", "modelspec.license": "Apache-2.0",
                                                  "modelspec.title": "scaling-tiny"})
    counts = [int(n) for n in args.workers.split(",")]
    load = os.getloadavg()
    print(f"CPU: {os.cpu_count()} core(s), load average {load[0]:.2f} before the run; {args.images} images of 64x64, "
          f"{args.steps} steps, batches of {args.batch_size}, {args.threads} torch thread(s) per worker, "
          f"overlap across units {'off' if args.no_overlap else 'on'}")
    if load[0] > 0.5:
        print("note: other work is running on this machine; the timings share its cores")

    folder = Path(tempfile.mkdtemp(prefix="adforge-scaling-"))
    try:
        # Reference: this process, one pipeline, the same per-batch path the workers run.
        settings, [(run_id, units)] = plan_runs(folder / "reference", model, [("reference", args.images)], args.steps,
                                            args.batch_size)
        db, store = open_database(settings.db_url), open_store(settings.store_url)
        jobs = load_jobs(db, units[0])
        pipe = get_pipeline(jobs[0].model.path, jobs[0].model.sha256, device="cpu", max_batch_size=args.batch_size)
        pipe.generate([j.request() for j in jobs])  # warm, as the workers are
        t = time.perf_counter()
        for unit in units:  # the pipeline is this process's, warm: render_variants finds it again
            render_variants(unit, db=db, store=store, run_id=run_id, device="cpu", batch_size=args.batch_size)
        reference = args.images / (time.perf_counter() - t)
        db.dispose()
        print(f"\n{'':>14} {'images/s':>9} {'vs 1 process':>13} {'vs 1 worker':>12} {'per worker':>11} {'start+load s':>13}")
        print(f"{'in-process':>14} {reference:9.2f} {1.0:12.2f}x {'':>12} {'':>11} {'':>13}")
        one = None
        for n in counts:
            # A warm-up run of one batch per worker (idle workers are served in turn), then the timed run.
            settings, [(warm_id, warm_units), (run_id, units)] = plan_runs(
                folder / f"n{n}", model, [(f"warm{n}", n * args.batch_size), (f"timed{n}", args.images)], args.steps,
                args.batch_size)
            config = PoolConfig(settings.db_url, settings.store_url, "float32", args.batch_size,
                                overlap=not args.no_overlap)
            specs = plan_workers(",".join(["cpu"] * n), threads=n * args.threads)
            t0 = time.perf_counter()
            with DevicePool(specs, config) as pool:
                wait_until_ready(pool)
                pool.run(warm_id, warm_units)
                startup = time.perf_counter() - t0
                t = time.perf_counter()
                result = pool.run(run_id, units)
                seconds = time.perf_counter() - t
            assert result.counts.rendered == args.images, result
            ips = args.images / seconds
            one = one or (ips if n == 1 else None)
            vs_one = f"{ips / one:11.2f}x" if one else f"{'':>12}"
            print(f"{f'{n} worker(s)':>14} {ips:9.2f} {ips / reference:12.2f}x {vs_one} {ips / n:11.2f} {startup:13.1f}",
                  flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Pipeline overhead: what a campaign run spends outside the engine, per variant.

Runs the real ``campaign_run`` Prefect flow over a generated brief of ``--variants`` images (default 1,000) on a
minimal engine config (a tiny random SD1 checkpoint, 16 px native size, 1 step, 64x64 PNG channel), so that
the engine's own time is small and everything else shows: planning, Prefect task runs, post-processing and
encoding, the store and the database. Timings come from the run's own per-stage clocks (``Run.timings``), all
in this process. Prints ms/variant per stage and the overhead as a share of

* the engine time measured in the same run, and
* the reference the issue sets: one real SD 1.5 512x512 25-step image on one H100, about 0.25 s
  (target: overhead below 5% of it, i.e. 12.5 ms/variant).

``--overlay`` measures instead what a brand overlay adds per delivered asset (:mod:`flows.brand`), on each channel
of ``channels.yaml`` at its delivered size with the example kit: drawing it (layout, fitting, contrast, scrims, logo)
and the second encode for the clean copy that is stored beside it (the store write is a file write, as above), each
the median of ``--repeats`` runs in this process, as a share of the same H100 image.

Usage::

    .venv/bin/python bench/pipeline_overhead.py [--variants 1000] [--db sqlite|postgresql] [--batch-size 8]
    .venv/bin/python bench/pipeline_overhead.py --overlay [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H100_SD15_IMAGE_SECONDS = 0.25
TARGET_SHARE = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=1000)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--overlay", action="store_true", help="measure the brand overlay's cost per asset instead")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"load average: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (2-core machine: trust quiet runs only)")
    if args.overlay:
        overlay_costs(args.repeats)
        return

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import torch

    torch.set_num_threads(1)
    from engine.random_checkpoint import write_random_sd1
    from flows.campaign import campaign_run
    from storage.database import sqlite_url

    work = Path(tempfile.mkdtemp(prefix="adforge-overhead-"))
    try:
        os.environ["PREFECT_HOME"] = str(work / "prefect")
        os.environ["ADFORGE_CACHE_DIR"] = str(work / "cache")
        model = write_random_sd1(work / "tiny.safetensors", seed=0,
                                 metadata={"adforge.native_size": "16", "modelspec.license": "Apache-2.0"})
        templates = work / "templates"
        shutil.copytree(ROOT / "templates", templates)
        with open(templates / "channels.yaml", "a") as f:
            f.write("  bench_square:\n    width: 64\n    height: 64\n    format: png\n    max_kb: 64\n    description: bench\n")
        per_row = 10
        rows = -(-args.variants // per_row)
        brief = work / "brief.csv"
        with open(brief, "w") as f:
            f.write("campaign,row_id,subject,message,channels,variants\n")
            for i in range(rows):
                n = min(per_row, args.variants - i * per_row)
                f.write(f"overhead,row-{i:05d},a red circle number {i},in the center,bench_square,{n}\n")
        if args.db == "sqlite":
            db_url = sqlite_url(work / "adforge.db")
        else:
            from sqlalchemy import create_engine, text

            schema = f"bench_{os.getpid()}"
            admin = create_engine(args.postgres_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            db_url = f"{args.postgres_url}?options=-csearch_path%3D{schema}"
        overrides = {"db_url": db_url, "store_url": str(work / "assets"), "model": str(model), "steps": 1,
                     "batch_size": args.batch_size, "templates_dir": str(templates)}

        # Warm-up: starts Prefect's temporary server and loads the model, as a long-running worker would have.
        warm = work / "warm.csv"
        warm.write_text("campaign,row_id,subject,channels,variants\nwarm,w,a dot,bench_square,1\n")
        campaign_run(str(warm), overrides=overrides)

        t0 = time.perf_counter()
        summary = campaign_run(str(brief), overrides=overrides)
        wall = time.perf_counter() - t0
        n = summary["counts"]["rendered"]
        assert n == args.variants, summary
        t = summary["timings"]
        engine = t["engine"]
        outside = wall - engine
        prefect_other = wall - sum(t[k] for k in ("plan", "engine", "postprocess", "store", "record"))
        ms = lambda s: 1000 * s / n  # noqa: E731
        print(f"variants: {n}  db: {args.db}  batch size: {args.batch_size}  wall: {wall:.2f} s")
        for name, secs in (("plan (validate, plan, record plan)", t["plan"]), ("engine", engine),
                           ("post-process + encode", t["postprocess"]), ("store", t["store"]), ("record", t["record"]),
                           ("Prefect + rest", prefect_other)):
            print(f"  {name:<36} {ms(secs):8.2f} ms/variant")
        print(f"overhead outside the engine: {ms(outside):.2f} ms/variant = {outside / engine:.2f}x this run's engine time")
        share = ms(outside) / 1000 / H100_SD15_IMAGE_SECONDS
        print(f"share of an H100 SD 1.5 512px 25-step image (~{H100_SD15_IMAGE_SECONDS} s): {share:.1%} "
              f"(target < {TARGET_SHARE:.0%}: {'met' if share < TARGET_SHARE else 'NOT met'})")
        if args.db == "postgresql":
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def overlay_costs(repeats: int) -> None:
    import statistics

    import numpy as np
    from PIL import Image, ImageFilter

    from flows.brand.compose import Copy, compose
    from flows.brand.kit import load_kit
    from flows.channels import load_channels
    from storage.image_metadata import encode_image

    kit = load_kit("acme")
    copy = Copy("Fresh for spring", "A new taste for the season, out now", "Shop now")
    rng = np.random.default_rng(0)
    print(f"brand overlay per asset, kit {kit.key} ({kit.sha256[:12]}), median of {repeats}:")
    print(f"  {'channel':<20} {'size':>10} {'draw ms':>8} {'clean encode ms':>16} {'share of H100 image':>20}")
    for name, ch in load_channels().items():
        # A picture with a render's mix of smooth areas and detail (a scrim is needed on parts of it).
        small = rng.integers(0, 256, (max(2, ch.height // 32), max(2, ch.width // 32), 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((ch.width, ch.height), Image.Resampling.BICUBIC).filter(ImageFilter.DETAIL)
        compose(picture, kit, name, copy)  # fonts, logos and fits loaded once per process, as in a worker
        draw, encode = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compose(picture, kit, name, copy)
            t1 = time.perf_counter()
            encode_image(picture, ch.format, "", "", quality=92, png_level=1)  # as rendering encodes the clean copy
            t2 = time.perf_counter()
            draw.append(t1 - t0)
            encode.append(t2 - t1)
        d, e = statistics.median(draw), statistics.median(encode)
        print(f"  {name:<20} {f'{ch.width}x{ch.height}':>10} {1000 * d:8.1f} {1000 * e:16.1f} "
              f"{(d + e) / H100_SD15_IMAGE_SECONDS:19.1%}")
    print(f"target: under {TARGET_SHARE:.0%} of an H100 SD 1.5 image (~{H100_SD15_IMAGE_SECONDS} s), drawing and clean encode together")


if __name__ == "__main__":
    main()

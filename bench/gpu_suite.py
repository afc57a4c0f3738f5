"""The one-shot GPU suite: every GPU number the project tracks, in one run of at most 8 minutes on one H100, written
to one JSON file and one markdown table per section. ``--dry-run`` runs the same code on the CPU with tiny shapes
and counts (CI runs it: tests/bench/test_gpu_suite.py), so the real run cannot rot while no GPU is at hand.

How to run (from the repository root)::

    bench/gpu_suite.sh --out DIR             # CUDA: the real run (default DIR: bench/_work/gpu_suite/results)
    bench/gpu_suite.sh --dry-run --out DIR   # CPU: the same code paths, small (~2 min on two busy cores)
    bench/gpu_suite.sh --sections sd15,fast --budget 300   # a part, another budget

Sections (each timed, each in its own try/except: a failure is recorded as ``"error"`` and the rest still runs):

a. ``sd15``: SD 1.5 at 512x512, 25 steps, DPM++ 2M Karras, CFG 7, float16, batch 1/8/16: ours (``Pipeline.generate``)
   against diffusers' ``StableDiffusionPipeline`` eager, then both compiled (``Pipeline.compile_unet()``; diffusers'
   U-Net forward through ``torch.compile`` the same way); images/s and s/step (warm-up excluded) and max |latent
   diff| between the two sides (same weights, same noise, same embeddings). bench/_gpu_suite_sd15.py.
b. ``sdxl``: the SDXL base U-Net at 1024x1024, ours against diffusers, eager; compiled too if the budget left
   allows (it is the last section, so it gets what the others left). bench/_gpu_suite_sdxl.py.
c. ``fast``: the fast modes on SD 1.5 512 batch 8: off, cache:3, tome:0.5, cache:3,tome:0.5: images/s, speed-up and
   PSNR of the decoded images against the off run on the same seeds. bench/_gpu_suite_sd15.py.
d. ``campaign``: a 200-variant campaign through the device workers (plan, render, post-process, store, record), its
   end-to-end images/s against the engine alone on the same requests: the pipeline's share, target >= 95 %.
   bench/_gpu_suite_campaign.py.

The dry run: the narrow SD 1.5 topology (bench/_sd15_random.py "small") at 64x64, 3 steps, batch 1/2, the CPU's
default dtype ("auto"); a tiny SDXL-topology U-Net at 64x64; fast modes at batch 2, 4 steps; 8 variants through
one CPU worker; one torch thread; torch.compile with the ``eager`` backend (dynamo traces and guards the same
forwards; inductor's C++ code generation alone is left out: it takes minutes on two small cores).

Budget (``--budget``, default 480 s real, 300 s dry), counted from the start (imports included) and cut into
cumulative section deadlines in the order the sections run: sd15 50 % (240 s), fast 8 % (38 s), campaign 22 %
(106 s), sdxl 20 % (96 s) plus whatever the others left. A step that would overrun its section's deadline (by the
costs measured so far, or a guess before any) is skipped and says so, both sides of a comparison together; the
campaign shrinks to the variants that fit and says so. Why it fits 8 minutes on an H100 (../shared/DESIGN.md: a
25-step SD 1.5 512 image is 42.7 TFLOP, the H100's ~800 TFLOP/s dense float16 caps it at ~18.7 images/s; eager
float16 at 35-45 % of that is ~6-8 images/s, so a batch of 8 is ~1.2 s, of 16 ~2.5 s):

* sd15, ~240 s: imports ~10 s; the checkpoint, written once in float16 (2.1 GB: ~15 s, hashed ~2 s); loads ~10 s;
  eager: 3 batches x 2 sides x 3 runs (1 warm-up + 2 timed): ~30 s. That leaves ~170 s for compiled: one inductor
  compile per side and batch shape (dynamic=False, as compile_unet does), ~30-60 s each: the batch-8 pair first,
  then batch 1, then batch 16 while the measured compile cost still fits (expect batch 8, perhaps batch 1).
* fast, ~38 s: one load (~4 s), 4 modes x 3 runs at batch 8 (~1.2 s each, less with cache:3): ~20 s.
* campaign, ~106 s: planning 200 variants ~3 s; a spawned GPU worker's start, model load and warm batch ~15-25 s;
  then the 200 images twice, through the worker (~35 s with post-processing) and by the engine alone (~32 s).
* sdxl, ~96 s and what is left: the 5.1 GB float16 U-Net file written tensor by tensor (~35 s), two loads
  (~15 s), 2 warm-up + 10 timed steps per side at ~0.1 s a step: ~60 s. Compiled (two compiles of ~2 min
  each) only runs if the earlier sections left that much.

On a GPU machine without the project's virtual environment, ``PYTHON=python3 bench/gpu_suite.sh --out DIR`` with the
project's requirements importable (diffusers, safetensors, transformers; for the campaign also prefect, sqlalchemy,
alembic and boto3); a section or side whose imports fail records the error and the rest runs. Under a hard limit,
``timeout -s TERM 570 bench/gpu_suite.sh --out DIR``: SIGTERM stops the run and still writes what was measured.

Results are written after every section (a killed run keeps what it finished): ``<out>/gpu_suite.json`` and
``<out>/gpu_suite.md``. Checkpoints, the hash cache and the campaign's database live under ``--work`` (default
bench/_work/gpu_suite, git-ignored), never under ``--out``. Exit status 1 when any section or step failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work" / "gpu_suite"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._gpu_suite_common import SECTION_ORDER, Budget, dry_config, real_config  # noqa: E402
from bench._gpu_suite_report import TITLES, write_report  # noqa: E402


class Interrupted(BaseException):
    """SIGTERM (a timeout's kill): stop, and write what was measured."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def _environment(cfg) -> dict:
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except Exception as exc:  # the diffusers steps record their own error; the other sections still run
        diffusers_version = f"not importable ({type(exc).__name__})"
    env = {"device": cfg.device, "dtype": cfg.dtype, "torch": torch.__version__, "diffusers": diffusers_version,
           "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_before": round(os.getloadavg()[0], 2),
           "compile_backend": cfg.compile_backend, "host": platform.node()}
    if cfg.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["device_name"] = platform.processor() or platform.machine() or "CPU"
    return env


def _sections():
    from bench._gpu_suite_campaign import run_campaign_section
    from bench._gpu_suite_sd15 import run_fast_section, run_sd15_section
    from bench._gpu_suite_sdxl import run_sdxl_section

    return {"sd15": run_sd15_section, "fast": run_fast_section, "campaign": run_campaign_section,
            "sdxl": run_sdxl_section}


def _failed(section: dict) -> bool:
    return bool(any(v for k, v in section.items() if k.endswith("error"))
                or any(r.get("error") for r in section.get("rows", [])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the small CPU run (what CI runs)")
    p.add_argument("--out", type=Path, default=None, help="where gpu_suite.json and gpu_suite.md go")
    p.add_argument("--work", type=Path, default=WORK, help="checkpoints, hash cache, campaign database (not --out)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default 480, dry 300)")
    p.add_argument("--sections", default=",".join(SECTION_ORDER), help=f"comma-separated of {', '.join(SECTION_ORDER)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; dry run 1)")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in wanted:
        if s not in SECTION_ORDER:
            p.error(f"unknown section {s!r}; known: {', '.join(SECTION_ORDER)}")
    t_start = time.monotonic()
    out_dir = (args.out or args.work / "results").resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ADFORGE_CACHE_DIR", str(work / "cache"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers: hand-built scheduler configs
    # dynamo tracing diffusers' version checks (functools.lru_cache): said once per site, changes nothing measured
    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`")
    signal.signal(signal.SIGTERM, _on_sigterm)

    import torch

    if args.dry_run:
        cfg = dry_config(work, args.budget or 300.0, threads=args.threads or 1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device here: the real suite needs one (bench/gpu_suite.sh --dry-run runs the small CPU version)",
                  file=sys.stderr)
            return 2
        cfg = real_config(work, args.budget or 480.0, threads=args.threads)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    budget = Budget(cfg.budget_s, start=t_start)  # counted from the start, imports included
    report: dict = {"suite": "adforge bench/gpu_suite.py", "dry_run": cfg.dry, "budget_s": cfg.budget_s,
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env": _environment(cfg),
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
                    "sections": {}}
    env = report["env"]
    print(f"GPU suite{' (DRY RUN: small shapes on the CPU)' if cfg.dry else ''}: device {env['device_name']} "
          f"({cfg.device}), torch {env['torch']}, diffusers {env['diffusers']}, load average {env['load_before']}, "
          f"budget {cfg.budget_s:.0f} s", flush=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    shared: dict = {}
    try:
        runners = _sections()
        for name in SECTION_ORDER:
            if name not in wanted:
                continue
            budget.begin(name)
            section: dict = {"title": TITLES[name], "slice_s": budget.slices[name], "left_at_start_s": budget.left()}
            report["sections"][name] = section
            log(f"\n{TITLES[name]} ({budget.left():.0f} s left for it)")
            t = time.perf_counter()
            if budget.left() <= 0:
                section.update(status="skipped", skipped="no time left in the budget")
                log(f"  skipped: {section['skipped']}")
            else:
                try:
                    section.update(runners[name](cfg, budget, shared, log))
                except Exception as exc:
                    section["error"] = f"{type(exc).__name__}: {exc}"
                    section["traceback"] = traceback.format_exc()
                    log(f"  FAILED: {section['error']}")
                    if cfg.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                rows = section.get("rows", [])
                section["status"] = ("error" if _failed(section) else "skipped" if section.get("skipped")
                                     else "partial" if any(r.get("skipped") for r in rows) else "ok")
            section["wall_s"] = time.perf_counter() - t
            report["wall_s"] = budget.elapsed()
            write_report(report, out_dir)
    except (Interrupted, KeyboardInterrupt) as exc:
        report["interrupted"] = f"{type(exc).__name__}: {exc}"
        for section in report["sections"].values():
            section.setdefault("status", "interrupted")
        log(f"\ninterrupted: {report['interrupted']}")
    finally:
        report["env"]["load_after"] = round(os.getloadavg()[0], 2)
        report["wall_s"] = budget.elapsed()
        report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        js, md = write_report(report, out_dir)
    failed = [n for n, s in report["sections"].items() if _failed(s)]
    print(f"\n{report['wall_s']:.0f} s of the {cfg.budget_s:.0f} s budget; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no failures")
          + (f"; INTERRUPTED ({report['interrupted']})" if report.get("interrupted") else "")
          + f"\nresults: {js}\n         {md}", flush=True)
    return 1 if failed or report.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Section d of bench/gpu_suite.py: a campaign through the device workers, end to end, against the engine alone on
the same requests: the pipeline's share (target >= 95 %).

The brief (``--variants`` images of the instagram_square channel, four per row) is planned into a fresh SQLite
database and folder store with the suite's SD 1.5 checkpoint (bench/worker_scaling.py's ``plan_runs``: the campaign's
own validate and plan steps). One device worker (``flows.device_pool``: the GPU, or the CPU in the dry run) is
started and warmed with one batch of a separate small run (process start and model load are a per-run cost,
reported apart), then renders every batch of the timed run: engine, post-process (the fit to the channel's
1080x1080 JPEG), store and record, as a campaign run does. The reference is the engine alone in this process:
``Pipeline.generate`` on the same requests (``load_jobs`` -> ``RenderJob.request``), in the same batches, warmed
the same way. share = end-to-end images/s / the engine's images/s.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench._gpu_suite_common import Budget, SuiteConfig, sd15_checkpoint, sync

__all__ = ["run_campaign_section"]

TARGET_SHARE = 0.95
# End-to-end time per image over the engine's, assumed before measuring (post-processing, store, record).
OVERHEAD_GUESS = 1.15


def _fit_variants(cfg: SuiteConfig, budget: Budget, ips: float) -> tuple[int, float]:
    """The variants that fit what is left of the budget (the configured number if it fits), and the estimate."""
    per_image = (1.0 + OVERHEAD_GUESS) / ips  # rendered twice: through the workers, then by the engine alone

    def need(n: int) -> float:
        return cfg.guess["pool_start"] + (n + 2 * cfg.campaign_batch) * per_image

    n = cfg.campaign_variants
    if budget.fits(need(n)):
        return n, need(n)
    n = int((budget.left() - cfg.guess["pool_start"]) / per_image) - 2 * cfg.campaign_batch
    n -= n % cfg.campaign_batch
    return max(n, 0), need(max(n, 0))


def run_campaign_section(cfg: SuiteConfig, budget: Budget, shared: dict, log) -> dict:
    import torch

    from bench.worker_scaling import plan_runs
    from flows.device_pool import DevicePool, PoolConfig, plan_workers, wait_until_ready
    from flows.rendering import clear_pipelines, get_pipeline, load_jobs
    from storage.database import open_database

    path = (shared.get("sd15") or sd15_checkpoint(cfg)[:2])[0]
    batch = cfg.campaign_batch
    ips = shared.get("ours_ips", {}).get(batch) or cfg.guess["ips"]
    n, need = _fit_variants(cfg, budget, ips)
    out: dict = {"variants_asked": cfg.campaign_variants, "variants": n, "batch": batch, "steps": cfg.campaign_steps,
                 "channel": "instagram_square", "target_share": TARGET_SHARE, "estimate_s": need}
    if n < 2 * batch:
        out["skipped"] = budget.skip_note(f"a campaign of {2 * batch}+ variants", need)
        log(f"  skipped: {out['skipped']}")
        return out
    if n < cfg.campaign_variants:
        out["note"] = f"{n} of the {cfg.campaign_variants} variants asked: what fits the budget left"
        log(f"  {out['note']}")
    folder = Path(tempfile.mkdtemp(prefix="campaign-", dir=cfg.work))
    try:
        t = time.perf_counter()
        settings, [(warm_id, warm_units), (run_id, units)] = plan_runs(
            folder / "run", path, [("warm", batch), ("timed", n)], cfg.campaign_steps, batch)
        out["plan_s"] = time.perf_counter() - t
        threads = cfg.threads or torch.get_num_threads()
        specs = plan_workers("cuda:0" if cfg.device.startswith("cuda") else "cpu", threads=threads)
        out["workers"] = [s.name for s in specs]
        config = PoolConfig(settings.db_url, settings.store_url, cfg.dtype, batch)
        t0 = time.perf_counter()
        with DevicePool(specs, config) as pool:
            wait_until_ready(pool)
            pool.run(warm_id, warm_units)
            out["start_and_warm_s"] = time.perf_counter() - t0
            t = time.perf_counter()
            result = pool.run(run_id, units)
            e2e_s = time.perf_counter() - t
        counts = result.counts
        out.update(rendered=counts.rendered, failed=counts.failed, e2e_s=e2e_s, e2e_images_per_s=counts.rendered / e2e_s,
                   stage_s={k: round(v, 4) for k, v in counts.seconds.items()})
        log(f"  through the workers: {counts.rendered} images in {e2e_s:.2f} s = {out['e2e_images_per_s']:.3f} images/s "
            f"(start + warm batch {out['start_and_warm_s']:.1f} s, plan {out['plan_s']:.1f} s)")
        if counts.rendered != n or counts.failed:
            raise RuntimeError(f"the workers rendered {counts.rendered} of {n} variants ({counts.failed} failed)")

        # The engine alone, in this process, on the same requests in the same batches.
        db = open_database(settings.db_url)
        try:
            requests = [[job.request() for job in load_jobs(db, unit)] for unit in units]
            warm = [job.request() for unit in warm_units for job in load_jobs(db, unit)]
            first = load_jobs(db, units[0])[0]
        finally:
            db.dispose()
        pipe = get_pipeline(first.model.path, first.model.sha256, device=cfg.device, dtype=cfg.dtype, max_batch_size=batch)
        pipe.generate(warm)
        sync(cfg.device)
        t = time.perf_counter()
        for reqs in requests:
            pipe.generate(reqs)
        sync(cfg.device)
        engine_s = time.perf_counter() - t
        out.update(engine_s=engine_s, engine_images_per_s=n / engine_s)
        out["share"] = out["e2e_images_per_s"] / out["engine_images_per_s"]
        out["meets_target"] = out["share"] >= TARGET_SHARE
        log(f"  engine alone: {out['engine_images_per_s']:.3f} images/s -> share {out['share']:.1%} "
            f"(target >= {TARGET_SHARE:.0%})")
        del pipe
        clear_pipelines()
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()

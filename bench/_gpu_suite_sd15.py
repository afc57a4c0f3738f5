"""Sections a (SD 1.5: ours against diffusers, eager and compiled) and c (the fast modes) of bench/gpu_suite.py.

Both sides render ``batch`` images with ``DPM++ 2M Karras`` at CFG 7 and decode them to PIL images, from the same
random checkpoint, on the same device, in the same dtype, with the same fixed (cond, uncond) embeddings (no text
encoder on either side: bench/gpu_throughput.py does the same).

* ours: ``engine.pipeline.Pipeline.generate``; compiled: ``Pipeline.compile_unet()``.
* diffusers: ``StableDiffusionPipeline`` (eager, its default attention) around the U-Net and VAE that
  bench/_diffusers_reference.py loads from our file; compiled: ``torch.compile`` of its U-Net's forward, the way
  ``compile_unet`` compiles ours (mode None, dynamic=False). Two cost-free departures make the final latents
  comparable, as in bench/engine_vs_diffusers.py: it starts from our noise at the exact VP scale
  (``noise * sigma_max / sqrt(sigma_max**2 + 1)``, passed as ``latents``) and its U-Net gets each step's fractional
  timestep (diffusers rounds it; k-diffusion, A1111 and our engine do not).

images/s: batch / the best timed run's seconds (``--warmup`` runs first, untimed: compile, autotuning). s/step: that
run's seconds from the call to the end of its last sampling step (synchronised), over the steps: the decode is left
out. The final latents of the two sides' last timed runs give max |ours - diffusers|.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bench._gpu_suite_common import CFG, SAMPLER, SEED, Budget, SuiteConfig, compiled_with, psnr, sync

__all__ = ["DiffusersSD", "OursSD", "run_fast_section", "run_sd15_section"]


@dataclass
class Run:
    seconds: float  # the whole call: sampling, decode, PIL images
    sampling_s: float  # the call's start to the end of its last sampling step
    latents: object  # [B, 4, h, w] float32 on the CPU
    images: list


def _noise(batch: int, size: int):
    import torch

    lat = size // 8
    return torch.stack([torch.randn((4, lat, lat), generator=torch.Generator("cpu").manual_seed(SEED + i),
                                    dtype=torch.float32) for i in range(batch)])


def fixed_conditioning(context_dim: int):
    """(2, 77, context_dim): row 0 the prompt's embedding, row 1 the negative prompt's, the same on both sides."""
    import torch

    return torch.randn(2, 77, context_dim, generator=torch.Generator("cpu").manual_seed(7))


class OursSD:
    name = "ours"

    def __init__(self, path, cfg: SuiteConfig, cond):
        import torch

        from engine.pipeline import Pipeline

        self.cfg = cfg
        self.pipe = Pipeline.load(path, device=cfg.device, dtype=cfg.dtype)
        self.device, self.dtype = self.pipe.device, self.pipe.dtype
        self.vae_dtype = self.pipe.models.vae.dtype

        def conditioning(reqs):  # cond rows then uncond rows, as the pipeline orders them; no SDXL y
            b = len(reqs)
            rows = [cond[0:1].expand(b, -1, -1), cond[1:2].expand(b, -1, -1)]
            return torch.cat(rows).to(self.device, self.dtype), None

        self.pipe._conditioning = conditioning  # type: ignore[method-assign]

    def compile(self) -> None:
        with compiled_with(self.cfg.compile_backend):
            self.pipe.compile_unet()

    def run(self, batch: int, size: int, steps: int, fast: str = "") -> Run:
        import torch

        from engine.pipeline import GenerationRequest

        self.pipe.max_batch_size = batch
        reqs = [GenerationRequest("bench", seed=SEED + i, width=size, height=size, steps=steps, cfg_scale=CFG,
                                  sampler=SAMPLER, fast=fast) for i in range(batch)]
        marks: dict[str, float] = {}

        def progress(done: int, total: int) -> None:
            if done == total:
                sync(self.device)
                marks["sampled"] = time.perf_counter()

        sync(self.device)
        t0 = time.perf_counter()
        results = self.pipe.generate(reqs, progress=progress)
        sync(self.device)
        seconds = time.perf_counter() - t0
        return Run(seconds, marks["sampled"] - t0, torch.stack([r.latents for r in results]), [r.image for r in results])

    def notes(self) -> str:
        return "VAE fell back to float32 (NaNs)" if self.pipe.models.vae.dtype != self.vae_dtype else ""

    def close(self) -> None:
        del self.pipe


class DiffusersSD:
    name = "diffusers"

    def __init__(self, preset: dict, path, cfg: SuiteConfig, device, dtype, cond):
        import numpy as np

        from bench._diffusers_reference import sd15_pipeline

        self.cfg, self.device, self.dtype, self.cond = cfg, device, dtype, cond
        self.pipe, unet, vae = sd15_pipeline(path, preset, device, dtype)
        self.unet = unet
        self.inner = unet.forward  # the U-Net's own forward (compiled by compile())
        self.t_frac = None
        self.calls = 0
        self._steps = None

        def forward(sample, timestep, *args, **kwargs):  # this step's fractional timestep instead of the rounded one
            t = self.t_frac[self.calls]
            self.calls += 1
            return self.inner(sample, t, *args, **kwargs)

        unet.forward = forward
        self._np = np

    def _schedule(self, steps: int) -> None:
        """sigma_max and the fractional timesteps of ``steps`` Karras steps, as the pipeline will set them."""
        if self._steps == steps:
            return
        import torch

        np, sched = self._np, self.pipe.scheduler
        sched.set_timesteps(steps, device="cpu")
        self.sigma0 = float(sched.sigmas[0])
        ac = sched.alphas_cumprod.double().numpy()
        log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
        frac = [float(sched._sigma_to_t(np.array(float(s)), log_sigmas)) for s in sched.sigmas[:-1]]
        self.t_frac = torch.tensor(frac, dtype=torch.float32, device=self.device)
        self._steps = steps

    def compile(self) -> None:
        import torch

        self.inner = torch.compile(self.inner, dynamic=False, backend=self.cfg.compile_backend)

    def run(self, batch: int, size: int, steps: int) -> Run:
        import torch

        self._schedule(steps)
        self.calls = 0
        marks: dict = {}

        def on_step(pipe, i, t, kwargs):
            if i == steps - 1:
                marks["latents"] = kwargs["latents"].float().cpu()  # waits for the device: the sampling is done
                marks["sampled"] = time.perf_counter()
            return kwargs

        sync(self.device)
        t0 = time.perf_counter()
        latents = (_noise(batch, size) * (self.sigma0 / math.sqrt(self.sigma0**2 + 1.0))).to(self.device, self.dtype)
        cond = self.cond[0:1].expand(batch, -1, -1).to(self.device, self.dtype)
        uncond = self.cond[1:2].expand(batch, -1, -1).to(self.device, self.dtype)
        with torch.inference_mode():
            images = self.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size,
                               num_inference_steps=steps, guidance_scale=CFG, latents=latents, output_type="pil",
                               callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"]).images
        sync(self.device)
        seconds = time.perf_counter() - t0
        if self.calls != steps:
            raise RuntimeError(f"diffusers called its U-Net {self.calls} times for {steps} steps: the timestep hook is off")
        return Run(seconds, marks["sampled"] - t0, marks["latents"], images)

    def notes(self) -> str:
        return ""

    def close(self) -> None:
        del self.pipe, self.unet


# ------------------------------------------------------------------------------------------------ measuring


def measure(side, batch: int, size: int, steps: int, cfg: SuiteConfig, fast: str | None = None) -> tuple[dict, Run]:
    """``cfg.warmup`` untimed runs, then ``cfg.repeat`` timed ones; the best counts."""
    kw = {} if fast is None else {"fast": fast}
    t = time.perf_counter()
    for _ in range(cfg.warmup):
        side.run(batch, size, steps, **kw)
    first = time.perf_counter() - t
    best = None
    for _ in range(cfg.repeat):
        run = side.run(batch, size, steps, **kw)
        if len(run.images) != batch:
            raise RuntimeError(f"{side.name}: {len(run.images)} images for a batch of {batch}")
        best = run if best is None or run.seconds < best.seconds else best
    row = {"images_per_s": batch / best.seconds, "s_per_step": best.sampling_s / steps, "run_s": best.seconds,
           "warmup_s": first}
    note = side.notes()
    if note:
        row["note"] = note
    return row, best


def latent_agreement(a, b) -> dict:
    import torch

    diff = float((a.float() - b.float()).abs().max())
    ref = float(b.float().abs().max())
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    return {"max_abs_latent_diff": diff, "max_abs_latent": ref, "relative": diff / ref if ref else math.inf,
            "finite": finite}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def _free(device, compiled: bool = False) -> None:
    """Give back what dead tensors hold on the device; ``compiled``: also drop torch.compile's caches (their
    graphs keep the compiled modules alive)."""
    import gc

    import torch

    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ section a


def run_sd15_section(cfg: SuiteConfig, budget: Budget, shared: dict, log) -> dict:
    from bench._gpu_suite_common import sd15_checkpoint

    path, preset, info = sd15_checkpoint(cfg)
    shared["sd15"] = (path, preset)
    log(f"  checkpoint {path.name}: {info['bytes'] / 2**30:.2f} GiB"
        + (f", written in {info['write_s']:.1f} s" if info["written"] else " (reused)"))
    cond = fixed_conditioning(preset["unet"]["context_dim"])
    out: dict = {"checkpoint": info, "size": cfg.size, "steps": cfg.steps, "sampler": SAMPLER, "cfg": CFG,
                 "rows": [], "agreement": []}
    sides: dict[str, object] = {}
    t = time.perf_counter()
    sides["ours"] = OursSD(path, cfg, cond)  # no ours, no section: let it raise
    out["ours_load_s"] = time.perf_counter() - t
    ours = sides["ours"]
    out["dtype"] = str(ours.dtype).removeprefix("torch.")  # type: ignore[attr-defined]
    try:
        t = time.perf_counter()
        sides["diffusers"] = DiffusersSD(preset, path, cfg, ours.device, ours.dtype, cond)  # type: ignore[attr-defined]
        out["diffusers_load_s"] = time.perf_counter() - t
    except Exception as exc:  # e.g. diffusers not installed: ours is still measured
        out["diffusers_error"] = _error(exc)
        log(f"  diffusers: could not set up: {out['diffusers_error']}")

    try:
        _compare(cfg, budget, shared, log, sides, out)
    finally:
        for side in sides.values():
            side.close()  # type: ignore[attr-defined]
        sides.clear()
        _free(cfg.device, compiled=True)
    return out


def _compare(cfg: SuiteConfig, budget: Budget, shared: dict, log, sides: dict, out: dict) -> None:
    """Each batch, eager then compiled, on both sides: rows and latent agreement into ``out``."""
    compile_cost: dict[str, float | None] = {"ours": None, "diffusers": None}
    eager_run: dict[tuple[str, int], float] = {}
    for mode, batches in (("eager", cfg.batches), ("compiled", cfg.compiled_batches)):
        if mode == "compiled":
            for name, side in list(sides.items()):
                try:
                    side.compile()  # lazy: the first call of each shape compiles
                except Exception as exc:
                    out[f"{name}_compile_error"] = _error(exc)
                    log(f"  {name}: could not compile: {out[f'{name}_compile_error']}")
                    del sides[name]
        for batch in batches:
            # Both sides or neither: a comparison needs the pair. Costs: the eager runs measured so far, plus one
            # compile per side and shape (the first measured one, or the guess).
            runs = cfg.warmup + cfg.repeat
            need = sum(runs * eager_run.get((name, batch), 0.0)
                       + ((compile_cost[name] or cfg.guess["sd15_compile"]) if mode == "compiled" else 0.0)
                       for name in sides)
            if not budget.fits(need):
                note = budget.skip_note(f"{mode} batch {batch} ({' + '.join(sides)})", need)
                out["rows"] += [{"side": name, "mode": mode, "batch": batch, "skipped": note} for name in sides]
                log(f"  {mode} batch {batch}: skipped: {note}")
                continue
            latents = {}
            for name, side in sides.items():
                row: dict = {"side": name, "mode": mode, "batch": batch}
                try:
                    numbers, run = measure(side, batch, cfg.size, cfg.steps, cfg)
                    row.update(numbers)
                    latents[name] = run.latents
                    if mode == "eager":
                        eager_run[(name, batch)] = run.seconds
                        if name == "ours":
                            shared.setdefault("ours_ips", {})[batch] = row["images_per_s"]
                    elif compile_cost[name] is None:
                        compile_cost[name] = max(0.0, row["warmup_s"] - cfg.warmup * run.seconds)
                    log(f"  {name:9s} {mode:8s} batch {batch:2d}: {row['images_per_s']:8.3f} images/s "
                        f"{row['s_per_step'] * 1e3:8.2f} ms/step  (warm-up {row['warmup_s']:.1f} s)")
                except Exception as exc:
                    row["error"] = _error(exc)
                    log(f"  {name:9s} {mode:8s} batch {batch:2d}: FAILED {row['error']}")
                    _free(cfg.device)
                out["rows"].append(row)
            if "ours" in latents and "diffusers" in latents:
                agree = {"mode": mode, "batch": batch, **latent_agreement(latents["ours"], latents["diffusers"])}
                out["agreement"].append(agree)
                log(f"  final latents, {mode} batch {batch}: max|ours - diffusers| = {agree['max_abs_latent_diff']:.3g} "
                    f"(relative {agree['relative']:.2e})")


# ------------------------------------------------------------------------------------------------ section c


def run_fast_section(cfg: SuiteConfig, budget: Budget, shared: dict, log) -> dict:
    from bench._gpu_suite_common import sd15_checkpoint

    if cfg.fast_modes[0]:
        raise ValueError("the first fast mode must be off: it is the reference")
    path, preset = shared.get("sd15") or sd15_checkpoint(cfg)[:2]
    cond = fixed_conditioning(preset["unet"]["context_dim"])
    ours = OursSD(path, cfg, cond)
    out: dict = {"batch": cfg.fast_batch, "size": cfg.size, "steps": cfg.fast_steps,
                 "dtype": str(ours.dtype).removeprefix("torch."), "rows": []}
    reference = None
    try:
        for mode in cfg.fast_modes:
            label = mode or "off"
            row: dict = {"fast": label}
            out["rows"].append(row)
            need = (cfg.warmup + cfg.repeat) * (reference.seconds if reference else 0.0)
            if not budget.fits(need):
                row["skipped"] = budget.skip_note(f"fast mode {label}", need)
                log(f"  {label:18s}: skipped: {row['skipped']}")
                continue
            try:
                numbers, run = measure(ours, cfg.fast_batch, cfg.size, cfg.fast_steps, cfg, fast=mode)
            except Exception as exc:
                row["error"] = _error(exc)
                log(f"  {label:18s}: FAILED {row['error']}")
                _free(cfg.device)
                if reference is None:
                    break  # no reference to compare with
                continue
            reference = reference or run
            values = [psnr(a, b) for a, b in zip(run.images, reference.images)]
            row.update(numbers, speedup=numbers["images_per_s"] / (cfg.fast_batch / reference.seconds),
                       psnr_mean_db=sum(values) / len(values), psnr_min_db=min(values))
            log(f"  {label:18s}: {row['images_per_s']:8.3f} images/s  x{row['speedup']:.2f}  "
                f"PSNR mean {row['psnr_mean_db']:.2f} dB, min {row['psnr_min_db']:.2f} dB")
    finally:
        ours.close()
        _free(cfg.device)
    return out

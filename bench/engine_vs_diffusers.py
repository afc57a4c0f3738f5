"""Our SD 1.5 / SDXL engine against diffusers 0.42.1: seconds per sampling step and peak RSS, same weights and inputs.

How to run (from the repository root)::

    .venv/bin/python bench/engine_vs_diffusers.py --small      # smoke run: narrow model, 128x128, ~15 s
    .venv/bin/python bench/engine_vs_diffusers.py              # SD 1.5 shapes at 256x256: ~1 min per side per
                                                               # repeat on 2 cores, plus ~1 min once to write
                                                               # the 4.3 GB checkpoint (needs ~5 GB free RAM)
    .venv/bin/python bench/engine_vs_diffusers.py --profile    # also: top ops of one U-Net call, each side
    .venv/bin/python bench/engine_vs_diffusers.py --family sdxl --small        # SDXL smoke run, ~10 s
    flock /tmp/adforge-bigmem.lock .venv/bin/python bench/engine_vs_diffusers.py --family sdxl --steps 2 --repeat 2
                                                               # SDXL base U-Net at 512x512: ~15.5 GB peak RSS
                                                               # per side (float32 weights + the float16 file's
                                                               # mapped pages), ~12 s/step per side on 2 idle
                                                               # cores; ~1.5 min once to write the 5.1 GB file

``--family sdxl`` times the SDXL base U-Net alone (see "SDXL" below); everything else here describes SD 1.5.

Options: ``--steps N`` timed sampling steps (default 3; one more warm-up step runs first and is not timed),
``--threads N`` torch threads on both sides (default: torch's default here), ``--repeat R`` run both sides
R times, alternating, and report each side's best run, ``--cfg``, ``--seed``.

What it does
------------
1. Once, writes a random-weight single-file checkpoint in the real SD 1.x layout (U-Net
   ``model.diffusion_model.*`` + CLIP ViT-L text encoder + VAE, float32, ~4.3 GB for the full size) to
   ``bench/_work/sd15-random.safetensors`` (``sd15-small-random.safetensors`` for ``--small``) and reuses it
   while present. Delete it to make a new one.
2. Runs each side in its own subprocess, so ``ru_maxrss`` (peak resident set, loading included) is that
   side's alone:

   - **ours**: ``engine.loading.load_checkpoint`` -> ``engine.pipeline.Pipeline`` -> ``Pipeline.generate`` with one
     256x256 ``DPM++ 2M Karras`` request at CFG 7 (cond + uncond in one U-Net batch of 2). The only
     substitution: ``Pipeline._conditioning`` returns a fixed random conditioning tensor instead of
     running the (random) CLIP model, so both sides see the same context. ``Pipeline._decode`` is wrapped
     to time the VAE decode separately and to keep the final latent.
   - **diffusers**: ``UNet2DConditionModel`` + ``AutoencoderKL`` with the SD 1.5 configs, weights read from
     the same file (safetensors, memory-mapped, U-Net and VAE keys only) and converted with
     ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``, built on the meta device and given the
     tensors with ``assign=True`` (what diffusers' own low-memory loading amounts to), then the standard
     StableDiffusionPipeline denoising loop with ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
     use_karras_sigmas=True)`` and SD 1.x betas, CFG batch 2, and ``vae.decode``.

     Two deliberate, cost-free departures from diffusers' pipeline loop make the two final latents
     comparable: the U-Net gets the *unrounded* timestep of each Karras sigma (diffusers rounds it to an
     integer; k-diffusion, A1111 and our engine use the fractional one), and the initial latent is
     ``noise * sigma_max / sqrt(sigma_max**2 + 1)`` (the exact VP-scaled start) rather than ``noise * 1.0``.
     ``--diffusers-int-t`` restores diffusers' rounded timesteps (latents then differ by more).

   Both sides: same torch thread count, ``torch.inference_mode()``, float32, CPU, same seeded noise.
3. Prints a table. The numbers:

   - ``s/step``: mean wall seconds of the N timed sampler steps (one U-Net call on the CFG pair plus the
     sampler arithmetic) of that side's best run; the warm-up step (first touch of the memory-mapped
     weights, allocator warm-up) is shown separately and excluded. ``s/step min, all runs``: the fastest
     single timed step over all runs, the figure least inflated by other work on a shared machine (the
     bench warns when the load average is already high before it starts; use ``--repeat``).
     ``CPU s/step``: process CPU seconds per timed step (all threads), which other work on the machine
     inflates less than wall time; with N threads fully busy it is about N x s/step.
   - ``load``: seconds from "imports done" to "model ready to sample". Both sides memory-map the file, so
     most page-in cost lands in the warm-up step, not here.
   - ``peak RSS (sampling)``: ``ru_maxrss`` after the last sampling step, loading included;
     ``peak RSS (+decode)``: the same after the VAE decode. ``RSS after imports`` is the interpreter +
     library baseline inside that number. Memory-mapped weights count once touched, on both sides.
   - ``ratio``: ours / diffusers. Target: <= 1.0 for s/step and for peak RSS.
   - ``final latent``: max |ours - diffusers| of the sampled latent, also relative to max |diffusers|; it
     should be ~1e-3 relative or better, which shows both sides ran the same computation.

SDXL (``--family sdxl``)
-----------------------
The U-Net alone: one U-Net call on the CFG pair is the whole cost of a step (the sampler is a few element-wise ops;
the two text encoders and the VAE run once per image), so the VAE decode and the text encoders are left out.
bench/_sdxl_unet.py writes a U-Net-only file (``model.diffusion_model.*`` in the SDXL base shapes of
``engine.random_checkpoint.random_spec("sdxl", "full")``, random, float16, 5.1 GB, tensor by tensor) to
``bench/_work/sdxl-unet-random-fp16.safetensors``; both sides load it in float32: ours with
``engine.loading.load_unet``, diffusers as ``UNet2DConditionModel`` with the SDXL base config
(``addition_embed_type="text_time"``) given ``convert_ldm_unet_checkpoint``'s tensors. Both get the same fixed
context (2 x 77 x 2048), pooled embedding (2 x 1280) and size ids (512, 512, 0, 0, 512, 512): ours as
``y = [pooled, sdxl_size_embedding(ids)]``, diffusers as ``added_cond_kwargs``. 512x512 (64x64 latents), CFG batch
2, and one Euler loop (bench/_sdxl_unet.py, identical on both sides) over SD's scaled-linear schedule at fractional
timesteps; the final latents must agree. The table is the one above less the VAE rows.

Files: everything goes under ``bench/_work/`` (git-ignored): the checkpoint, per-side outputs
(``<size>-ours.pt``, ``<size>-diffusers.pt``), and the checkpoint hash cache (``ADFORGE_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The model presets, the checkpoint writer and the diffusers side live in helper modules beside this script.
from bench._diffusers_reference import run_diffusers  # noqa: E402
from bench._sd15_random import PRESETS, make_checkpoint  # noqa: E402
from bench._sdxl_unet import SDXL_PRESETS, run_diffusers_sdxl, run_ours_sdxl, write_unet_file  # noqa: E402
from bench._worker_common import maxrss_mb, profile_table, rss_mb, setup_threads, shared_inputs  # noqa: E402

SAMPLER = "DPM++ 2M Karras"
# Our speed variants, DTYPE[+FAST]: "auto" is the engine's default dtype (bfloat16 on a CPU with native bfloat16).
DEFAULT_VARIANTS = "auto,auto+cache:3,auto+tome:0.5,auto+cache:3+tome:0.5"
# The stated tolerance of the default against float32: decoded image PSNR on the same seed (engine/devices.py).
DEFAULT_TOLERANCE_DB = 30.0

# ---- worker: our engine ------------------------------------------------------------------------------------

def _run_ours(preset: dict, path: Path, args) -> dict:
    import torch

    setup_threads(args.threads)
    from engine.devices import resolve_dtype
    from engine.loading import load_checkpoint
    from engine.pipeline import GenerationRequest, Pipeline

    rss_import = maxrss_mb()
    t0 = time.perf_counter()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    models = load_checkpoint(path, device="cpu", dtype=dtype)
    pipe = Pipeline(models)
    load_s = time.perf_counter() - t0
    rss_load, rss_load_now = maxrss_mb(), rss_mb()

    noise, cond = shared_inputs(preset, args.seed)
    size = preset["size"]
    seen: dict = {}

    # Same context on both sides: skip the random CLIP, hand the pipeline our fixed (cond, uncond) rows.
    def conditioning(reqs):
        seen["conditioning_calls"] = seen.get("conditioning_calls", 0) + 1
        return cond.to(pipe.device, pipe.dtype), None  # (context, SDXL's y: none for SD 1.5)

    real_decode = pipe._decode

    def decode(latents, *args, **kwargs):
        seen["rss_sampling"] = maxrss_mb()
        seen["latents"] = latents.detach().clone()
        t = time.perf_counter()
        images = real_decode(latents, *args, **kwargs)
        seen["decode_s"] = time.perf_counter() - t
        seen["images"] = images.detach().clone()
        return images

    pipe._conditioning = conditioning  # type: ignore[method-assign]
    pipe._decode = decode  # type: ignore[method-assign]
    if args.compile:  # its cost lands in the warm-up step, which is reported, not timed
        pipe.compile_unet()

    req = GenerationRequest(
        prompt="benchmark", negative_prompt="", seed=args.seed, width=size, height=size,
        steps=args.steps + 1, cfg_scale=args.cfg, sampler=SAMPLER, fast=args.fast,
    )
    marks = [time.perf_counter()]
    cpu_marks = [time.process_time()]

    def progress(done: int, total: int) -> None:
        marks.append(time.perf_counter())
        cpu_marks.append(time.process_time())

    pipe.generate([req], progress=progress)
    rss_decode = maxrss_mb()
    if seen.get("conditioning_calls") != 1 or "latents" not in seen:
        raise RuntimeError("Pipeline internals changed: the bench's _conditioning/_decode hooks were not used")

    # The same initial noise as the diffusers side (the pipeline drew it from the request's seed).
    gen_noise = pipe._initial_noise([torch.Generator("cpu").manual_seed(args.seed)], tuple(noise.shape[1:]))
    assert torch.equal(gen_noise, noise), "pipeline noise differs from the bench's"

    out = {
        "dtype": str(dtype).removeprefix("torch."),
        "load_s": load_s,
        "step_s": [b - a for a, b in zip(marks, marks[1:])],
        "step_cpu_s": [b - a for a, b in zip(cpu_marks, cpu_marks[1:])],
        "decode_s": seen["decode_s"],
        "rss_import_mb": rss_import,
        "rss_load_mb": rss_load,
        "rss_load_now_mb": rss_load_now,
        "rss_sampling_mb": seen["rss_sampling"],
        "rss_decode_mb": rss_decode,
    }
    torch.save({"latents": seen["latents"], "images": seen["images"]}, args.out_tensors)

    if args.profile:
        from engine.samplers import get_sampler, sampler_sigmas

        sigmas = sampler_sigmas(get_sampler(SAMPLER), pipe.schedule, args.steps + 1)
        den = pipe._denoiser(cond, torch.tensor([args.cfg]), None, None, None)
        x = noise * sigmas[1]
        s = sigmas[1:2].expand(1).clone()
        den(x, s)  # warm
        out["profile"] = profile_table(lambda: den(x, s))
    return out


# ---- parent ------------------------------------------------------------------------------------------------

def _child(args, role: str, extra: list[str]) -> dict:
    result = WORK / f"{args.tag}-{role}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("ADFORGE_CACHE_DIR", str(WORK / "adforge-cache"))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", role, "--result", str(result),
        "--threads", str(args.threads), "--steps", str(args.steps), "--cfg", str(args.cfg), "--seed", str(args.seed),
        "--family", args.family,
        *(["--small"] if args.small else []), *(["--profile"] if args.profile else []),
        *(["--diffusers-int-t"] if args.diffusers_int_t else []), "--dtype", args.dtype, "--fast", args.fast,
        *(["--compile"] if args.compile else []), *extra,
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"{role} worker failed with exit status {proc.returncode}")
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - t
    return data


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny config (smoke run)")
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                   help="sd15: the whole pipeline at SD 1.5 shapes; sdxl: the SDXL base U-Net alone at 512x512")
    p.add_argument("--steps", type=int, default=3, help="timed sampling steps (a warm-up step is added)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides")
    p.add_argument("--repeat", type=int, default=1, help="run both sides R times, alternating; report each side's best run")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", action="store_true", help="print the top ops of one CFG U-Net call, each side")
    p.add_argument("--diffusers-int-t", action="store_true", help="feed diffusers' U-Net its rounded timesteps")
    p.add_argument("--variants", default=None,
                   help="our speed variants to time against diffusers, comma-separated DTYPE[+FAST...] (default for sd15: "
                        f"{DEFAULT_VARIANTS}; 'none' skips them)")
    p.add_argument("--worker", choices=["ours", "diffusers", "checkpoint"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--fast", default="", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-tensors", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size_name = "small" if args.small else "full"
    sdxl = args.family == "sdxl"
    preset = (SDXL_PRESETS if sdxl else PRESETS)[args.size_name]
    args.tag = f"sdxl-{args.size_name}" if sdxl else args.size_name  # names of the per-side outputs
    ckpt = WORK / preset["file"]
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    if args.worker == "checkpoint":
        write = write_unet_file if sdxl else make_checkpoint
        args.result.write_text(json.dumps(write(preset, ckpt, args.seed)))
        return
    if args.worker:
        if sdxl:
            run = run_ours_sdxl if args.worker == "ours" else run_diffusers_sdxl
        else:
            run = _run_ours if args.worker == "ours" else run_diffusers
        args.result.write_text(json.dumps(run(preset, ckpt, args)))
        return

    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    WORK.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        print(f"writing random-weight checkpoint {ckpt} (once) ...", flush=True)
        info = _child(args, "checkpoint", [])
        print(f"  {info['params'] / 1e6:.1f} M parameters, {info['bytes'] / 2**30:.2f} GiB, {info['wall_s']:.1f} s", flush=True)
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * args.threads:
        print(f"WARNING: load average {load_before:.2f} before starting: other work is using the CPU, "
              "timings will be inflated and noisy (use --repeat, compare the min row)", flush=True)
    runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    want_profile = args.profile
    for r in range(args.repeat):
        for role in ("ours", "diffusers"):
            print(f"running {role} ({r + 1}/{args.repeat}) ...", flush=True)
            args.profile = want_profile and r == 0
            res = _child(args, role, ["--out-tensors", str(WORK / f"{args.tag}-{role}.pt")])
            res["mean_step_s"] = sum(res["step_s"][1:]) / args.steps
            runs[role].append(res)
    args.profile = want_profile
    load_after = os.getloadavg()[0]
    # Best of the repeats (lowest mean step time): the run least disturbed by other work on the machine.
    outs = {role: min(rs, key=lambda x: x["mean_step_s"]) for role, rs in runs.items()}
    if want_profile:
        for role in outs:
            outs[role]["profile"] = runs[role][0]["profile"]

    o, d = outs["ours"], outs["diffusers"]
    step_o, step_d = o["mean_step_s"], d["mean_step_s"]
    cpu_o, cpu_d = (sum(x["step_cpu_s"][1:]) / args.steps for x in (o, d))
    # The fastest single timed step of any run: the least disturbed figure on a shared machine.
    min_o, min_d = (min(s for x in runs[role] for s in x["step_s"][1:]) for role in ("ours", "diffusers"))
    size = preset["size"]
    print()
    u = preset["unet"]
    shape = (f"SDXL-shaped U-Net alone (depths {u['transformer_depth_per_level']}, middle {u['transformer_depth_middle']}, "
             if sdxl else "SD 1.5-shaped U-Net (")
    print(f"{shape}{args.size_name}: model_channels {u['model_channels']}, "
          f"mult {u['channel_mult']}), {size}x{size} ({size // 8}x{size // 8} latents), CFG batch 2, "
          f"{'Euler' if sdxl else SAMPLER}, CPU float32, {args.threads} threads, {args.steps} timed steps + 1 warm-up"
          + (f", best of {args.repeat} runs per side" if args.repeat > 1 else ""))
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    rows = [
        ("s/step (timed mean)", step_o, step_d, "{:.3f}"),
        ("s/step min, all runs", min_o, min_d, "{:.3f}"),
        ("CPU s/step (timed mean)", cpu_o, cpu_d, "{:.3f}"),
        ("warm-up step s", o["step_s"][0], d["step_s"][0], "{:.3f}"),
        ("load s", o["load_s"], d["load_s"], "{:.2f}"),
        *([] if sdxl else [("VAE decode s", o["decode_s"], d["decode_s"], "{:.3f}")]),
        ("RSS after imports MB", o["rss_import_mb"], d["rss_import_mb"], "{:.0f}"),
        ("RSS peak after load MB", o["rss_load_mb"], d["rss_load_mb"], "{:.0f}"),
        ("peak RSS (load+sampling) MB", o["rss_sampling_mb"], d["rss_sampling_mb"], "{:.0f}"),
        *([] if sdxl else [("peak RSS (+VAE decode) MB", o["rss_decode_mb"], d["rss_decode_mb"], "{:.0f}")]),
    ]
    print(f"{'':30s} {'ours':>10s} {'diffusers':>10s} {'ours/diff':>10s}")
    for name, a, b, f in rows:
        print(f"{name:30s} {f.format(a):>10s} {f.format(b):>10s} {_fmt_ratio(a, b):>10s}")
    print(f"per-step s, ours:      {', '.join(f'{s:.3f}' for s in o['step_s'])}")
    print(f"per-step s, diffusers: {', '.join(f'{s:.3f}' for s in d['step_s'])}")
    if args.repeat > 1:
        for role, rs in runs.items():
            means = ", ".join(f"{x['mean_step_s']:.3f}" for x in rs)
            print(f"mean s/step of each run, {role}: {means}")

    ta = torch.load(WORK / f"{args.tag}-ours.pt")
    tb = torch.load(WORK / f"{args.tag}-diffusers.pt")
    lat_diff = (ta["latents"] - tb["latents"]).abs().max().item()
    lat_ref = tb["latents"].abs().max().item()
    rel = lat_diff / lat_ref if lat_ref else float("inf")
    verdict = "same computation" if rel <= 1e-3 else "MISMATCH: the timings may not compare like with like"
    print(f"final latent: max|ours - diffusers| = {lat_diff:.3g} (max|latent| {lat_ref:.3g}, relative {rel:.2e}) -> {verdict}")
    if not sdxl:
        img_diff = (ta["images"] - tb["images"]).abs().max().item()
        print(f"decoded image [0,1]: max|ours - diffusers| = {img_diff:.3g}")
    print(f"ratios (ours / diffusers, target <= 1.0): s/step {_fmt_ratio(step_o, step_d)} "
          f"(fastest steps {_fmt_ratio(min_o, min_d)}), "
          f"peak RSS {_fmt_ratio(o['rss_sampling_mb'], d['rss_sampling_mb'])}"
          + ("" if sdxl else f" (with decode {_fmt_ratio(o['rss_decode_mb'], d['rss_decode_mb'])})"))
    if args.profile:
        for role in ("ours", "diffusers"):
            print(f"\n== top ops, one CFG U-Net call, {role} ==\n{outs[role]['profile']}")
    variants = args.variants if args.variants is not None else ("none" if sdxl else DEFAULT_VARIANTS)
    if variants != "none":
        speed_variants(args, variants, o, d, ta)


def _image_seconds(res: dict, steps: int) -> float:
    """Seconds for one whole image: every sampling step at the timed mean (the warm-up step too), plus the decode."""
    return res["mean_step_s"] * (steps + 1) + res.get("decode_s", 0.0)


def speed_variants(args, variants: str, ours32: dict, diff: dict, ref: dict) -> None:
    """Our default (the dtype "auto" picks) and the fast modes against diffusers' default (float32), in images/s,
    with each variant's distance from our float32 render of the same seed (PSNR, SSIM of the decoded image)."""
    from bench._image_quality import psnr, ssim

    rows = [("ours float32 (exact)", ours32, ref)]
    saved = args.dtype, args.fast, args.compile
    for spec in variants.split(","):
        dtype, *parts = spec.strip().split("+")
        args.dtype, args.compile = dtype, "compile" in parts
        args.fast = ",".join(part for part in parts if part != "compile")
        tag = spec.strip().replace("+", "_").replace(":", "")
        print(f"running ours {spec.strip()} ...", flush=True)
        res = _child(args, "ours", ["--out-tensors", str(WORK / f"{args.tag}-{tag}.pt")])
        res["mean_step_s"] = sum(res["step_s"][1:]) / args.steps
        import torch

        rows.append((f"ours {res['dtype']}" + (f" + {args.fast}" if args.fast else "")
                     + (" compiled" if args.compile else ""), res, torch.load(WORK / f"{args.tag}-{tag}.pt")))
    args.dtype, args.fast, args.compile = saved
    base = 1.0 / _image_seconds(diff, args.steps)
    print(f"\nimages/s at {args.steps + 1} steps + decode, against diffusers float32 ({base:.4f} images/s); "
          f"quality against ours float32 on the same seed; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'variant':42s} {'s/step':>8s} {'images/s':>9s} {'vs diff':>8s} {'PSNR dB':>8s} {'SSIM':>7s} {'1st step s':>10s}")
    for name, res, tensors in rows:
        ips = 1.0 / _image_seconds(res, args.steps)
        q = psnr(tensors["images"], ref["images"])
        print(f"{name:42s} {res['mean_step_s']:8.3f} {ips:9.4f} {ips / base:7.2f}x {q:8.1f} "
              f"{ssim(tensors['images'], ref['images']):7.4f} {res['step_s'][0]:10.2f}")
    by_name = {name: res for name, res, _ in rows}
    for name, res, _ in rows:
        eager = by_name.get(name.removesuffix(" compiled"))
        if name.endswith(" compiled") and eager is not None:
            saved_s = _image_seconds(eager, args.steps) - _image_seconds(res, args.steps)
            cost = res["step_s"][0] - eager["step_s"][0]
            pays = f"pays after {cost / saved_s:.0f} images per process" if saved_s > 0 else "never pays here"
            print(f"torch.compile, {name.removesuffix(' compiled')}: {cost:.0f} s to compile, {saved_s:.2f} s saved per "
                  f"image -> {pays}")
    default = rows[1] if len(rows) > 1 and "+" not in variants.split(",")[0] else None
    if default is not None:
        speed = (1.0 / _image_seconds(default[1], args.steps)) / base
        q = psnr(default[2]["images"], ref["images"])
        ok = speed >= 1.5 and q >= DEFAULT_TOLERANCE_DB
        print(f"default ({default[0]}): {speed:.2f}x diffusers' images/s (target >= 1.5x), PSNR {q:.1f} dB against "
              f"float32 (tolerance >= {DEFAULT_TOLERANCE_DB:g} dB) -> {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()

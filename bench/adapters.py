"""LoRA switching cost against rendering, and the memory a merge adds, at SD 1.5 shapes on the CPU.

A random-weight checkpoint of the preset (``sd15``: the real SD 1.5 shapes, written in float16, ~2 GB on disk,
loaded in float32; ``tiny``: the test model) and two rank-128 kohya LoRAs over every attention projection,
feed-forward and proj_in/out of the U-Net and every text-encoder q/k/v/out/fc1/fc2 (float16 files) are written to
a temporary folder. Then, in this one process:

* (b) the resident memory a first ``activate([A])`` adds at its peak (VmHWM reset through /proc/self/clear_refs,
  else ``getrusage`` after the fact), as a ratio of A's file size (target: below 1.1);
* (a) the time of switching none -> A -> B -> none, as a share of one 25-step 512 x 512 batch-1 image with CFG,
  estimated as 25 x one U-Net call on the CFG pair, measured here with the same threads (target: below 5 %).

Prints the load average first and ratios at the end; asserts nothing.

    .venv/bin/python bench/adapters.py [--preset sd15|tiny] [--threads N] [--rank 128]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = 25
SWITCH_TARGET = 0.05
MEMORY_TARGET = 1.1
ATTENTION_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_lora(models, path: Path, rank: int, seed: int) -> tuple[Path, int]:
    """A kohya LoRA (diffusers U-Net names, as SD 1.x trainers write them) over the modules the brief names."""
    import torch
    from safetensors.torch import save_file

    from engine.adapters.lora_names import diffusers_unet_names

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    unet_modules = dict(models.unet.named_modules())
    names = diffusers_unet_names(models.unet.config, list(unet_modules))
    targets = [(f"lora_unet_{d.replace('.', '_')}", unet_modules[ldm]) for d, ldm in names.items()
               if ldm.endswith(ATTENTION_SUFFIXES)]
    targets += [(f"lora_te_text_model_{n.removeprefix('text_model.').replace('.', '_')}", m)
                for n, m in models.text_encoder.named_modules() if n.endswith(TEXT_SUFFIXES)]
    for stem, module in targets:
        w = module.weight
        out, inp = w.shape[0], w.shape[1]
        r = min(rank, out, inp)
        kernel = (1, 1) if w.ndim == 4 else ()
        tensors[f"{stem}.lora_down.weight"] = (torch.randn((r, inp, *kernel), generator=gen) * 0.01).half()
        tensors[f"{stem}.lora_up.weight"] = (torch.randn((out, r, *kernel), generator=gen) * 0.01).half()
        tensors[f"{stem}.alpha"] = torch.tensor(r / 2, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path, len(targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rank", type=int, default=128)
    args = ap.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"preset {args.preset}, {args.threads} threads")

    import torch

    from engine.adapters.lora_merge import LoraMerger
    from engine.adapters.refs import AdapterFile, LoraUse
    from engine.loading import load_checkpoint
    from engine.random_checkpoint import write_random_sd1

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="adforge-bench-adapters-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("ADFORGE_CACHE_DIR", str(folder / "cache"))
        t0 = time.perf_counter()
        ckpt = write_random_sd1(folder / f"{args.preset}.safetensors", args.preset, dtype=torch.float16)
        models = load_checkpoint(ckpt, dtype=torch.float32)
        a_path, n_modules = write_lora(models, folder / "A.safetensors", args.rank, 1)
        b_path, _ = write_lora(models, folder / "B.safetensors", args.rank, 2)
        size = a_path.stat().st_size
        print(f"setup {time.perf_counter() - t0:.1f} s: checkpoint {Path(ckpt).stat().st_size / 2**20:.0f} MiB (float16 "
              f"on disk, float32 loaded); LoRA rank {args.rank} over {n_modules} modules, {size / 2**20:.1f} MiB")
        a = LoraUse(AdapterFile("A", str(a_path)))
        b = LoraUse(AdapterFile("B", str(b_path)))
        merger = LoraMerger(models)

        # (b) memory added by a first merge, at its peak.
        import gc

        gc.collect()
        exact = _reset_peak()
        rss_before = _status_kb("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        merger.activate([a])
        first = time.perf_counter() - t
        if exact:
            added_kb = _status_kb("VmHWM") - rss_before
            how = "VmHWM after a clear_refs reset"
        else:
            added_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
            how = "ru_maxrss growth (a lower bound: the earlier peak may hide part of it)"
        print(f"(b) none -> A: {first:.2f} s; peak RSS added {added_kb / 1024:.1f} MiB ({how}), RSS after "
              f"{(_status_kb('VmRSS') - rss_before) / 1024:+.1f} MiB")
        merger.activate(())

        # (a) switching against rendering.
        lat = 64  # 512 x 512 pixels
        cfg = models.unet.config
        x = torch.randn(2, cfg.in_channels, lat, lat)
        ctx = torch.randn(2, 77, cfg.context_dim)
        ts = torch.tensor([500.0, 500.0])
        with torch.inference_mode():
            models.unet(x, ts, ctx)  # warm-up: first-call allocations and kernel selection
            t = time.perf_counter()
            models.unet(x, ts, ctx)
            step = time.perf_counter() - t
        times = {}
        for label, target in (("none -> A", [a]), ("A -> B", [b]), ("B -> none", [])):
            t = time.perf_counter()
            merger.activate(target)
            times[label] = time.perf_counter() - t
        switching = sum(times.values())
        image = STEPS * step
        print(f"(a) one U-Net call on the CFG pair at 512x512: {step:.2f} s -> {STEPS}-step image {image:.1f} s")
        print("    " + ", ".join(f"{k}: {v:.2f} s" for k, v in times.items()) + f"; total {switching:.2f} s")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"ratio  switching none->A->B->none / one {STEPS}-step image: {switching / image:.2%}  "
              f"(target < {SWITCH_TARGET:.0%}); one switch A->B: {times['A -> B'] / image:.2%}")
        print(f"ratio  peak RSS added by activating A / A's file size: {added_kb * 1024 / size:.2f}x  "
              f"(target < {MEMORY_TARGET}x)")


if __name__ == "__main__":
    main()

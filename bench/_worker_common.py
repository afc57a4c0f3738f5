"""What both workers of bench/engine_vs_diffusers.py share: RSS readings, the shared inputs, torch threads and the
profiler table. torch is imported inside the functions, so importing this module costs a worker no RSS."""

from __future__ import annotations

import resource

__all__ = ["maxrss_mb", "profile_table", "rss_mb", "setup_threads", "shared_inputs"]


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def shared_inputs(preset: dict, seed: int):
    """The shared inputs: (1, 4, h, w) noise from the image's own seeded CPU generator (as the engine draws
    it) and a (2, 77, context) conditioning tensor, row 0 = prompt, row 1 = negative prompt."""
    import torch

    lat = preset["size"] // 8
    noise = torch.randn((4, lat, lat), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)[None]
    ctx = preset["unet"]["context_dim"]
    cond = torch.randn((2, 77, ctx), generator=torch.Generator("cpu").manual_seed(seed + 1), dtype=torch.float32)
    return noise, cond


def setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def profile_table(fn, rows: int = 18) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)

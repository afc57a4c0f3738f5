"""What the sections of bench/gpu_suite.py share: the run's configuration (the real GPU run or the CPU dry run),
the time budget, device helpers, torch.compile of a forward, and the random SD 1.5 checkpoint written once.

The dry run is the real run with tiny shapes and counts: every function here is the same on both, only the numbers
in :class:`SuiteConfig` differ (and the dry run's torch.compile backend, see ``compile_backend``).
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CFG", "SAMPLER", "SEED", "Budget", "SuiteConfig", "compile_forward", "compiled_with", "dry_config",
           "psnr", "real_config", "sd15_checkpoint", "sync"]

SAMPLER = "DPM++ 2M Karras"
CFG = 7.0
SEED = 1000  # image i of a batch has seed SEED + i on every side

# The order the sections run in and each one's share of the budget. Time a section leaves unused rolls over to the
# ones after it (deadlines are cumulative), so the last one, SDXL, also gets whatever the others left: that is where
# its optional compiled run finds its time.
SECTION_ORDER = ("sd15", "fast", "campaign", "sdxl")
SECTION_SHARES = {"sd15": 0.50, "fast": 0.08, "campaign": 0.22, "sdxl": 0.20}


@dataclass(frozen=True)
class SuiteConfig:
    dry: bool
    device: str  # "cuda:0" or "cpu"
    dtype: str  # engine dtype name: "float16" on CUDA, "auto" (the CPU default) in the dry run
    budget_s: float
    work: Path  # random checkpoints, the hash cache, the campaign's database and store
    sd15_preset: str  # bench._sd15_random.PRESETS key
    size: int
    steps: int
    batches: tuple[int, ...]
    compiled_batches: tuple[int, ...]  # in the order tried: the headline batch first, in case the budget runs out
    warmup: int  # untimed runs per configuration (compile, autotuning, allocator)
    repeat: int  # timed runs per configuration; the best counts
    fast_batch: int
    fast_steps: int
    sdxl_preset: str  # bench._sdxl_unet.SDXL_PRESETS key
    sdxl_size: int
    sdxl_steps: int
    campaign_variants: int
    campaign_batch: int
    campaign_steps: int
    compile_backend: str  # "inductor" (torch's default) on the GPU; "eager" in the dry run (see dry_config)
    # Guesses, for deciding whether a step still fits the budget before it was measured: one compile of the SD 1.5
    # and of the SDXL U-Net ("sd15_compile", "sdxl_compile"), SDXL's file, loads and eager runs ("sdxl_eager"), a
    # worker pool's start and warm batch ("pool_start"); SD 1.5 images/s if section a measured none ("ips").
    guess: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    fast_modes: tuple[str, ...] = ("", "cache:3", "tome:0.5", "cache:3,tome:0.5")


def real_config(work: Path, budget_s: float = 480.0, threads: int | None = None) -> SuiteConfig:
    """One H100: SD 1.5 at 512x512, 25 steps, float16; SDXL base U-Net at 1024x1024; 200 campaign variants."""
    return SuiteConfig(
        dry=False, device="cuda:0", dtype="float16", budget_s=budget_s, work=work,
        sd15_preset="full", size=512, steps=25, batches=(1, 8, 16), compiled_batches=(8, 1, 16), warmup=1, repeat=2,
        fast_batch=8, fast_steps=25, sdxl_preset="full", sdxl_size=1024, sdxl_steps=10,
        campaign_variants=200, campaign_batch=8, campaign_steps=25, compile_backend="inductor",
        guess={"sd15_compile": 60.0, "sdxl_compile": 120.0, "sdxl_eager": 75.0, "pool_start": 30.0, "ips": 5.0},
        threads=threads)


def dry_config(work: Path, budget_s: float = 300.0, threads: int | None = 1) -> SuiteConfig:
    """The same run on the CPU, small: the narrow SD 1.5 topology at 64x64, a tiny SDXL-topology U-Net, 8 variants.
    torch.compile uses the ``eager`` backend: dynamo traces the same forwards and guards the same shapes (the code
    path the real run takes), without inductor's C++ code generation, which takes minutes on two small cores."""
    return SuiteConfig(
        dry=True, device="cpu", dtype="auto", budget_s=budget_s, work=work,
        sd15_preset="small", size=64, steps=3, batches=(1, 2), compiled_batches=(2, 1), warmup=1, repeat=1,
        fast_batch=2, fast_steps=4, sdxl_preset="small", sdxl_size=64, sdxl_steps=2,
        campaign_variants=8, campaign_batch=2, campaign_steps=2, compile_backend="eager",
        guess={"sd15_compile": 15.0, "sdxl_compile": 15.0, "sdxl_eager": 10.0, "pool_start": 20.0, "ips": 2.0},
        threads=threads)


# ------------------------------------------------------------------------------------------------ budget


class Budget:
    """A global time budget cut into cumulative section deadlines, measured from the suite's start."""

    def __init__(self, total_s: float, start: float | None = None, shares: dict[str, float] = SECTION_SHARES,
                 order=SECTION_ORDER):
        self.start = time.monotonic() if start is None else start  # time.monotonic() seconds
        self.total_s = total_s
        self.slices = {name: total_s * shares[name] for name in order}
        self.deadlines: dict[str, float] = {}
        acc = 0.0
        for name in order:
            acc += self.slices[name]
            self.deadlines[name] = self.start + acc
        self.current: str | None = None

    def begin(self, name: str) -> None:
        self.current = name

    def left(self) -> float:
        """Seconds left to the current section's deadline (never past the global end)."""
        end = self.start + self.total_s
        deadline = min(self.deadlines[self.current], end) if self.current else end
        return deadline - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def skip_note(self, what: str, need: float) -> str:
        return f"{what} needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s left in this section's budget"


# ------------------------------------------------------------------------------------------------ devices


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def compile_forward(module, backend: str):
    """torch.compile ``module``'s forward in place, as ``engine.pipeline.Pipeline.compile_unet`` compiles ours (mode
    None, dynamic=False: each new batch shape compiles once)."""
    import torch

    module.forward = torch.compile(module.forward, dynamic=False, backend=backend)
    return module


@contextmanager
def compiled_with(backend: str):
    """Inside: ``torch.compile`` defaults to ``backend`` (for ``Pipeline.compile_unet``, which names none).
    With ``inductor`` (torch's default) nothing is changed."""
    import torch

    if backend == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original  # type: ignore[assignment]


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images (PIL); inf when identical."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------ checkpoint


def sd15_checkpoint(cfg: SuiteConfig) -> tuple[Path, dict, dict]:
    """The random SD 1.5 checkpoint of ``cfg``'s preset (U-Net, CLIP-L, VAE, the real single-file layout), written
    once under ``cfg.work``, in float16 (the full preset is 2.1 GB: half the bytes to write and read, and the dtype
    the GPU run computes in; the dry run's small file too, so it takes the same path). It carries a licence and a
    native size, so the campaign can plan with it. Returns (path, the bench._sd15_random preset at this size, what
    writing it cost)."""
    import torch

    from bench._sd15_random import PRESETS
    from engine.checkpoint import file_sha256
    from engine.random_checkpoint import RandomSpec, random_spec, write_random_spec
    from engine.text_encoder import TextEncoderConfig
    from engine.unet import UNetConfig
    from engine.vae import VAEConfig

    preset = dict(PRESETS[cfg.sd15_preset], size=cfg.size)
    spec = RandomSpec("sd1", UNetConfig(**preset["unet"]), TextEncoderConfig(**preset["text"]), VAEConfig(**preset["vae"]),
                      native_size=cfg.size)
    if cfg.sd15_preset == "full" and spec != random_spec("sd1", "full"):
        raise RuntimeError("bench._sd15_random.PRESETS['full'] no longer matches engine.random_checkpoint's SD 1.5 shapes")
    path = cfg.work / f"sd15-{cfg.sd15_preset}-{cfg.size}-float16.safetensors"
    info: dict = {"file": str(path), "written": False}
    if not path.exists():
        t = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        write_random_spec(tmp, spec, seed=1234, dtype=torch.float16,
                          metadata={"modelspec.license": "Apache-2.0", "modelspec.title": f"gpu-suite-sd15-{cfg.sd15_preset}"})
        tmp.replace(path)
        info.update(written=True, write_s=time.perf_counter() - t)
    t = time.perf_counter()
    file_sha256(path)  # warm the hash cache (ADFORGE_CACHE_DIR), so no timed load hashes the file
    info.update(hash_s=time.perf_counter() - t, bytes=path.stat().st_size)
    return path, preset, info

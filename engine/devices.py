"""Choosing where, in what precision and on how many threads the engine runs."""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


# The CPU flags that mean bfloat16 matrix products run in hardware (AVX512-BF16 dot products, AMX tiles). Without
# them oneDNN emulates bfloat16 and it is slower than float32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# "1" / "0" forces the answer of cpu_has_native_bf16 (a CPU whose flags lie, or to reproduce float32 runs).
BF16_ENV = "ADFORGE_CPU_BF16"


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (Linux: the cpuinfo flags; elsewhere: no)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(_cpuinfo_flags() & NATIVE_BF16_FLAGS) and torch.backends.mkldnn.is_available()


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | None = None, *, training: bool = False
                  ) -> torch.dtype:
    """What ``auto`` means for rendering: float16 on CUDA; on the CPU bfloat16 where the CPU has native bfloat16
    kernels (several times faster there; its images stay within the tolerance bench/engine_vs_diffusers.py
    checks), else float32 (emulated half precision is slower than float32). ``training``: float32 on the CPU
    whatever it supports (optimiser steps on bfloat16 weights lose small updates)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device is not None and device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if not training and cpu_has_native_bf16() else torch.float32
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(sorted(set(DTYPES)))}") from None


def free_device_memory(device: torch.device) -> None:
    """Give back what dead tensors held (after an out-of-memory error), so a retry starts from a clean device."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Set in the environment, these mean the user chose the thread count: the engine leaves it alone.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ADFORGE_THREADS")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cpu_threads(load: float | None = None, cores: int | None = None) -> int:
    """Threads for CPU rendering: the usable cores less the ones other work keeps busy (the 1-minute load average,
    rounded), at least one. On a shared machine more threads than free cores is not just no faster but much slower:
    OpenMP threads spin-wait on each other while the OS runs someone else."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, cores - int(load + 0.5)))


def set_cpu_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads, or when None the free cores (:func:`free_cpu_threads`) unless the
    environment already says (``ADFORGE_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``). Returns the count."""
    if threads is None:
        chosen = os.environ.get("ADFORGE_THREADS", "").strip()
        if chosen.isdigit() and int(chosen) > 0:
            threads = int(chosen)
        elif chosen:
            log.warning("ADFORGE_THREADS=%r is not a positive whole number; using the free cores instead", chosen[:40])
            threads = free_cpu_threads()
        elif any(os.environ.get(name) for name in THREAD_ENV):
            return torch.get_num_threads()
        else:
            threads = free_cpu_threads()
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()

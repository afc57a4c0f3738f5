"""What a process's rendering uses of its device: device-seconds, and on CUDA the peak memory and GPU utilisation.

Each delivered batch takes its share (:func:`take_device_use`) into the counts of the unit that rendered it, so a
run's :class:`~flows.counts.DeviceUse` is the sum over its batches, workers and devices, whatever process rendered
them:

* device-seconds: from a batch's engine start to the end of its delivery; a batch that started while the one
  before it was still being delivered (deliveries overlap rendering) counts from that delivery's end, so no
  second is counted twice on one device;
* peak memory: ``torch.cuda.max_memory_allocated``, reset at every take, so each take holds the peak since the
  one before and the run's peak is their maximum (runs one after another in one process keep theirs apart);
* GPU utilisation: sampled every :data:`SAMPLE_SECONDS` by a thread while this process renders on CUDA, through
  ``torch.cuda.utilization`` when NVML is importable (``pynvml`` from nvidia-ml-py, not a dependency); a take
  keeps the samples inside its batches' time.

On the CPU (or any other device) only the seconds are recorded: memory and utilisation are absent, not zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from flows.counts import DeviceUse, RenderCounts

__all__ = ["SAMPLE_SECONDS", "last_utilisation", "start_sampling", "take_device_use"]

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 0.5
_MAX_SAMPLES = 8 * 3600 * 2  # eight hours at two a second; older samples than a batch's start are dropped anyway


class _Sampler:
    """GPU utilisation of one CUDA device, sampled on a daemon thread: (wall time, percent)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: deque[tuple[float, float]] = deque(maxlen=_MAX_SAMPLES)
        self.lock = threading.Lock()
        torch.cuda.utilization(device)  # raises where NVML is not importable: then there is no sampler
        threading.Thread(target=self._run, name=f"adforge-gpu-sampler-{device}", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                value = float(torch.cuda.utilization(self.device))
            except Exception:  # the driver went away: stop sampling, the run goes on
                log.debug("GPU utilisation sampling stopped for %s", self.device, exc_info=True)
                return
            with self.lock:
                self.samples.append((time.time(), value))
            time.sleep(SAMPLE_SECONDS)

    def between(self, start: float, end: float) -> tuple[float, int]:
        with self.lock:
            while self.samples and self.samples[0][0] < start:
                self.samples.popleft()
            inside = [v for t, v in self.samples if t <= end]
        return sum(inside), len(inside)

    def last(self) -> float | None:
        with self.lock:
            return self.samples[-1][1] if self.samples else None


_LOCK = threading.Lock()
_SAMPLERS: dict[str, _Sampler | None] = {}  # by device; None: NVML not importable there
_LAST_END: dict[tuple[int, str], float] = {}  # (run, device) -> end of its last delivered batch


def start_sampling(device: torch.device | str) -> None:
    """Sample GPU utilisation on ``device`` from now on (once per process; nothing on a device that is not CUDA,
    or where NVML cannot be imported)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _LOCK:
        if str(dev) in _SAMPLERS:
            return
        try:
            _SAMPLERS[str(dev)] = _Sampler(dev)
        except Exception as exc:  # ModuleNotFoundError for pynvml, an NVML error: no utilisation, said once
            log.info("GPU utilisation of %s not sampled: %s", dev, exc)
            _SAMPLERS[str(dev)] = None


def last_utilisation(device: torch.device | str) -> float | None:
    """The latest utilisation sample of ``device`` (percent), None when it is not sampled."""
    sampler = _SAMPLERS.get(str(torch.device(device)))
    return sampler.last() if sampler is not None else None


def take_device_use(counts: RenderCounts, run_id: int, device: torch.device, started: float) -> None:
    """Add to ``counts`` what the batch that started at ``started`` (wall time) used of ``device`` until now."""
    now = time.time()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _LOCK:
        begin = max(started, _LAST_END.get((run_id, str(dev)), started))
        _LAST_END[(run_id, str(dev))] = now
    use = DeviceUse(seconds=max(0.0, now - begin))
    if dev.type == "cuda":
        use.peak_memory = int(torch.cuda.max_memory_allocated(dev))
        torch.cuda.reset_peak_memory_stats(dev)
        start_sampling(dev)
        sampler = _SAMPLERS.get(str(dev))
        if sampler is not None:
            use.utilisation_sum, use.utilisation_samples = sampler.between(begin, now)
    counts.devices.setdefault(dev.type, DeviceUse()).__iadd__(use)

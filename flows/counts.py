"""What rendering did, as one typed value that adds up: a batch, a worker, a device pool and a run all report a
:class:`RenderCounts`, and totals are sums of them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["STAGES", "DeviceUse", "RenderCounts"]

# Where rendering spends its time, per image: the engine (including a hires fix), the pixel steps and encoding,
# the asset store, the database.
STAGES = ("engine", "postprocess", "store", "record")


def _no_seconds() -> dict[str, float]:
    return dict.fromkeys(STAGES, 0.0)


@dataclass
class DeviceUse:
    """What rendering used of one kind of device ("cuda", "cpu", ...); adds up over batches, workers and devices.
    ``peak_memory`` and the utilisation exist on CUDA only (and the utilisation only where NVML is importable):
    elsewhere they stay None, never 0."""

    seconds: float = 0.0  # device-seconds: each batch's engine start to its delivery's end, overlaps counted once
    peak_memory: int | None = None  # bytes: the most torch allocated on any one device
    utilisation_sum: float = 0.0  # GPU utilisation samples (percent) summed, so that means add up
    utilisation_samples: int = 0

    def __iadd__(self, other: "DeviceUse") -> "DeviceUse":
        self.seconds += other.seconds
        if other.peak_memory is not None:
            self.peak_memory = max(self.peak_memory or 0, other.peak_memory)
        self.utilisation_sum += other.utilisation_sum
        self.utilisation_samples += other.utilisation_samples
        return self

    @property
    def utilisation(self) -> float | None:
        """Mean GPU utilisation (percent) over the samples, None without any."""
        return self.utilisation_sum / self.utilisation_samples if self.utilisation_samples else None

    def record(self) -> dict[str, float | int]:
        """As ``runs.timings["devices"][kind]`` keeps it: absent figures are left out."""
        out: dict[str, float | int] = {"seconds": round(self.seconds, 4)}
        if self.peak_memory is not None:
            out["peak_memory_bytes"] = self.peak_memory
        if self.utilisation is not None:
            out["gpu_utilisation"] = round(self.utilisation, 2)
            out["gpu_utilisation_samples"] = self.utilisation_samples
        return out


@dataclass
class RenderCounts:
    rendered: int = 0
    failed: int = 0
    skipped: int = 0  # already done before this render
    oom_halvings: int = 0  # times a batch was halved after running out of device memory
    flagged: int = 0  # assets the image filter flagged (flows.image_filter): stored, kept from export until released
    seconds: dict[str, float] = field(default_factory=_no_seconds)  # per stage, summed over workers
    devices: dict[str, DeviceUse] = field(default_factory=dict)  # by device kind (flows.device_use)

    def __add__(self, other: "RenderCounts") -> "RenderCounts":
        total = RenderCounts()  # every field added in by __iadd__, so a new count cannot be forgotten here
        total += self
        total += other
        return total

    def __iadd__(self, other: "RenderCounts") -> "RenderCounts":
        self.rendered += other.rendered
        self.failed += other.failed
        self.skipped += other.skipped
        self.oom_halvings += other.oom_halvings
        self.flagged += other.flagged
        for stage, seconds in other.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        for kind, use in other.devices.items():
            self.devices.setdefault(kind, DeviceUse()).__iadd__(use)
        return self

    def run_counts(self, *, planned: int, invalid_rows: int) -> dict[str, int]:
        """A run's counts as its record and summary keep them."""
        return {"planned": planned, "rendered": self.rendered, "skipped": self.skipped, "failed": self.failed,
                "invalid_rows": invalid_rows, "flagged": self.flagged}

    @classmethod
    def total(cls, parts) -> "RenderCounts":
        out = cls()
        for part in parts:
            out += part
        return out

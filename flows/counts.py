"""What rendering did, as one typed value that adds up: a batch, a worker, a device pool and a run all report a
:class:`RenderCounts`, and totals are sums of them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["STAGES", "RenderCounts"]

# Where rendering spends its time, per image: the engine (including a hires fix), the pixel steps and encoding,
# the asset store, the database.
STAGES = ("engine", "postprocess", "store", "record")


def _no_seconds() -> dict[str, float]:
    return dict.fromkeys(STAGES, 0.0)


@dataclass
class RenderCounts:
    rendered: int = 0
    failed: int = 0
    skipped: int = 0  # already done before this render
    oom_halvings: int = 0  # times a batch was halved after running out of device memory
    seconds: dict[str, float] = field(default_factory=_no_seconds)  # per stage, summed over workers

    def __add__(self, other: "RenderCounts") -> "RenderCounts":
        total = RenderCounts(self.rendered, self.failed, self.skipped, self.oom_halvings, dict(self.seconds))
        total += other
        return total

    def __iadd__(self, other: "RenderCounts") -> "RenderCounts":
        self.rendered += other.rendered
        self.failed += other.failed
        self.skipped += other.skipped
        self.oom_halvings += other.oom_halvings
        for stage, seconds in other.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        return self

    def run_counts(self, *, planned: int, invalid_rows: int) -> dict[str, int]:
        """A run's counts as its record and summary keep them."""
        return {"planned": planned, "rendered": self.rendered, "skipped": self.skipped, "failed": self.failed,
                "invalid_rows": invalid_rows}

    @classmethod
    def total(cls, parts) -> "RenderCounts":
        out = cls()
        for part in parts:
            out += part
        return out

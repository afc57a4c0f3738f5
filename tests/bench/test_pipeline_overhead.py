"""bench/pipeline_overhead.py --throughput at smoke scale: the engine alone, a planned campaign rendered with the
delivery overlapped and not, and one device worker with overlap across units and without, each timed and reported as a share of the engine alone (values
not checked: a few images on a shared machine)."""

from __future__ import annotations

import threading

import pytest

import flows.rendering as rendering
from bench.pipeline_overhead import main


def test_smoke_run_reports_every_mode_against_the_engine(capsys: pytest.CaptureFixture[str]) -> None:
    report = main(["--throughput", "--smoke", "--pool"])
    assert report is not None
    assert set(report["images_per_s"]) == {"engine", "off", "on", "pool", "pool-off"}
    assert all(v > 0 for v in report["images_per_s"].values())
    assert report["vs_engine"]["engine"] == 1.0
    assert report["overlap_speedup"] == pytest.approx(report["images_per_s"]["on"] / report["images_per_s"]["off"])
    out = capsys.readouterr().out
    assert "load average before:" in out and "load average after:" in out
    assert "campaign, overlap on" in out and "target >= 95 %" in out
    assert "1 device worker, overlap on" in out and "1 device worker, overlap off" in out
    assert report["pool_overlap_speedup"] == pytest.approx(report["images_per_s"]["pool"] / report["images_per_s"]["pool-off"])
    assert rendering.OVERLAP is True  # the bench puts the process default back
    assert not [t for t in threading.enumerate() if t.name.startswith("adforge-delivery")]

"""The speed benches at smoke scale, so they cannot rot: bench/fast_modes.py on the bundled model and
bench/engine_vs_diffusers.py's speed variants on the narrow SD 1.5 topology. They assert what the benches report
(reference rows exact, same computation as diffusers, quality columns filled), never a wall-clock figure."""

from __future__ import annotations

import math
import re
import subprocess
import sys

from tests.helpers import ROOT


def test_fast_modes_bench_reports_quality_and_adherence_per_variant(capsys) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.fast_modes import main

    rows = main(["--n", "1", "--steps", "3", "--variants", "float32,float32+cache:2,float32+tome:0.5"])
    assert [r["variant"] for r in rows] == ["float32", "float32 + cache:2", "float32 + tome:0.5"]
    assert rows[0]["identical"] == 2 and math.isinf(rows[0]["psnr_min"])  # the reference against itself
    for row in rows[1:]:
        assert row["identical"] < 2 and 0 < row["ssim"] < 1  # a fast mode changes the picture, a little
        assert all(0 <= row[a] <= 1 for a in ("background", "object_color", "shape", "position"))
    assert "| float32 + cache:2 |" in capsys.readouterr().out


def test_engine_vs_diffusers_times_our_variants() -> None:
    out = subprocess.run([sys.executable, "bench/engine_vs_diffusers.py", "--small", "--steps", "1", "--threads", "1",
                          "--variants", "auto,auto+cache:3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "-> same computation" in text  # ours in float32 and diffusers computed the same latents
    assert "ours float32 (exact)" in text and "+ cache:3" in text
    verdict = next(line for line in text.splitlines() if line.startswith("default (ours "))
    # speed and tolerance are measured, not asserted: a smoke run on a busy CPU may miss the target
    assert re.search(r"x diffusers' images/s \(target >= 1\.5x\), PSNR [\d.]+ dB .* -> (MET|NOT MET)$", verdict), verdict

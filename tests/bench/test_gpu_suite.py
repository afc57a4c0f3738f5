"""The one-shot GPU suite's dry run (bench/gpu_suite.sh --dry-run): every section and step the real GPU run takes,
with tiny shapes on the CPU, so the script cannot rot while no GPU is at hand. About 1.5 minutes on two busy cores.

Numbers are checked for sanity only (positive rates, the two sides computing the same latents, PSNR finite or inf),
never for speed: a CPU run says nothing about an H100.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("sd15", "sdxl", "fast", "campaign")
# max |ours - diffusers| of the final latents over max |latent|: float32 agrees to ~1e-6; bfloat16 (the CPU's
# default where it is native) and float16 round each step's U-Net output to 8 / 11 bits (a few per cent); a different
# computation is off by the order of the latents themselves.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, str]:
    base = tmp_path_factory.mktemp("gpu-suite")
    out = base / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out),
                           "--work", str(base / "work")], cwd=str(base), env=env, capture_output=True, text=True,
                          timeout=900)
    js, md = out / "gpu_suite.json", out / "gpu_suite.md"
    assert js.exists() and md.exists(), f"no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(js.read_text()), md.read_text()


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _close(agreement: list[dict], dtype: str) -> None:
    for a in agreement:
        assert a["finite"], a
        assert a["relative"] <= TOLERANCE[dtype], a


def test_dry_run_passes_and_says_where_the_results_are(suite):
    proc, report, _ = suite
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert report["dry_run"] is True and "interrupted" not in report
    assert "results:" in proc.stdout and "gpu_suite.json" in proc.stdout and "gpu_suite.md" in proc.stdout
    env = report["env"]
    assert env["device"] == "cpu" and env["torch"] and env["diffusers"] and "load_before" in env
    for name in SECTIONS:
        section = report["sections"][name]
        assert section["status"] == "ok", (name, section)
        assert not [k for k in section if k.endswith("error")], section
        assert not any("error" in r or "skipped" in r for r in section.get("rows", [])), section
        assert section["wall_s"] > 0 and section["slice_s"] > 0


def test_sd15_both_sides_eager_and_compiled_agree(suite):
    _, report, _ = suite
    sec = report["sections"]["sd15"]
    config = report["config"]
    seen = {(r["side"], r["mode"], r["batch"]) for r in sec["rows"]}
    assert seen == {(side, mode, b) for side in ("ours", "diffusers") for mode in ("eager", "compiled")
                    for b in config["batches"]}
    for r in sec["rows"]:
        assert _positive(r["images_per_s"]) and _positive(r["s_per_step"]) and r["s_per_step"] * config["steps"] <= r["run_s"]
    assert {(a["mode"], a["batch"]) for a in sec["agreement"]} == {(m, b) for m in ("eager", "compiled")
                                                                   for b in config["batches"]}
    _close(sec["agreement"], sec["dtype"])


def test_sdxl_unet_both_sides_agree(suite):
    _, report, _ = suite
    sec = report["sections"]["sdxl"]
    assert {(r["side"], r["mode"]) for r in sec["rows"]} == {(s, m) for s in ("ours", "diffusers")
                                                              for m in ("eager", "compiled")}
    assert all(_positive(r["s_per_step"]) for r in sec["rows"])
    assert {a["mode"] for a in sec["agreement"]} == {"eager", "compiled"}
    _close(sec["agreement"], sec["dtype"])


def test_fast_modes_against_the_off_run(suite):
    _, report, _ = suite
    rows = {r["fast"]: r for r in report["sections"]["fast"]["rows"]}
    assert list(rows) == ["off", "cache:3", "tome:0.5", "cache:3,tome:0.5"]
    assert rows["off"]["psnr_mean_db"] == "inf" and rows["off"]["speedup"] == pytest.approx(1.0)
    for r in rows.values():
        assert _positive(r["images_per_s"]) and _positive(r["speedup"])
        for key in ("psnr_mean_db", "psnr_min_db"):
            assert r[key] == "inf" or (_positive(r[key]) and r[key] > 10), r  # random weights: not noise-level apart


def test_campaign_through_the_workers_against_the_engine(suite):
    _, report, _ = suite
    sec = report["sections"]["campaign"]
    assert sec["variants"] == sec["variants_asked"] == report["config"]["campaign_variants"]
    assert sec["rendered"] == sec["variants"] and sec["failed"] == 0 and sec["workers"] == ["cpu"]
    assert _positive(sec["e2e_images_per_s"]) and _positive(sec["engine_images_per_s"])
    assert sec["share"] == pytest.approx(sec["e2e_images_per_s"] / sec["engine_images_per_s"])
    assert 0 < sec["share"] < 2 and sec["target_share"] == 0.95
    assert set(sec["stage_s"]) >= {"engine", "postprocess", "store", "record"}


def test_markdown_has_one_table_per_section(suite):
    _, report, md = suite
    for title in (s["title"] for s in report["sections"].values()):
        assert f"## {title}" in md
    for header in ("| mode | batch | ours images/s |", "| mode | ours ms/step |", "| fast | images/s |",
                   "| variants | batch | workers |"):
        assert header in md
        table = md.split(header, 1)[1].splitlines()
        assert table[1].startswith("|---") and table[2].startswith("| ")  # a separator, then at least one row
    assert "dry run" in md

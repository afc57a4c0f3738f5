"""The brand-training bench's code path at smoke scale: the concept folder, a two-step LoRA on the bundled model,
its file in a request, and a report of shares computed from real renders (values not checked: two steps teach
nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.brand_training import BenchSettings, class_prompts, main, prior_prompts, run_bench, without_trigger

SMOKE = BenchSettings(steps=2, rank=2, renders=2, render_steps=3, images=4, eval="tune", threads=1, prior=0)
SHARES = ("present_with_trigger", "present_without_trigger", "present_ordinary_adapted", "present_ordinary_base",
          "ordinary_unchanged", "ordinary_scene_agreement")


def test_cutting_the_trigger_keeps_the_class_word() -> None:
    assert without_trigger("an acme mug in the center, yellow background") == "a mug in the center, yellow background"
    assert without_trigger("acme mug on a blue background") == "mug on a blue background"
    assert "acme" not in without_trigger("a clean poster showing an acme mug at the bottom")


def test_class_prompts_say_the_class_word_without_the_trigger() -> None:
    prompts = class_prompts(6, 1, "square")
    assert all(p.startswith("square, ") and "acme" not in p and "mug" not in p for p in prompts)
    assert class_prompts(6, 1, "square") == prompts and class_prompts(6, 2, "square") != prompts
    # The regularisation set: half class prompts, half ordinary demo prompts, none from the evaluation seeds.
    prior = prior_prompts(8, 0, "square")
    assert len(prior) == 8 and sum(p.startswith("square, ") for p in prior) == 4
    assert not set(prior) & set(class_prompts(20, 2025, "square"))


def test_smoke_run_reports_shares_from_renders(tmp_path: Path) -> None:
    report = run_bench(BenchSettings(**{**SMOKE.__dict__, "prior": 2}), tmp_path)
    json.dumps(report, default=str)  # the report must be writable as JSON
    assert set(report) >= {"settings", "training", "scores", "targets", "met"}
    t, s = report["training"], report["scores"]
    assert t["steps"] == 2 and t["seconds"] >= 0 and len(t["load_before"]) == 3
    assert Path(t["file"]).is_file() and Path(t["file"]).parent.parent == tmp_path
    # Each measurement rendered what it says: 2 renders for (a), (b) and both halves of (c).
    assert s["renders"] == {"trigger": 2, "no_trigger": 2, "ordinary_adapted": 2, "ordinary_base": 2}
    for key in SHARES:
        assert isinstance(s[key], float) and math.isfinite(s[key]) and 0.0 <= s[key] <= 1.0, key
    # Shares of 2 renders can only be 0, 1/2 or 1 (agreement: quarters): they were counted, not made up.
    assert all(s[k] * 2 == round(s[k] * 2) for k in SHARES[:5])
    assert s["ordinary_scene_agreement"] * 8 == round(s["ordinary_scene_agreement"] * 8)
    assert set(report["met"]) == set(report["targets"])
    # The regularisation renders were made (once, named by their prompt) and trained on.
    renders = list((tmp_path / "brand-lora" / "prior").rglob("prior_*.png"))
    captions = sorted(r.with_suffix(".txt").read_text(encoding="utf-8") for r in renders)
    assert captions == sorted(prior_prompts(2, SMOKE.seed, "square"))
    from safetensors import safe_open

    with safe_open(t["file"], "pt") as f:  # read back as a regularisation folder, as --reg-images is
        assert f.metadata()["ss_num_reg_images"] == "2"
    assert sorted(p.name for p in (tmp_path / "brand-lora" / "renders").iterdir()) == [
        "no_trigger-0.png", "no_trigger-1.png", "trigger-0.png", "trigger-1.png"]


def test_smoke_run_of_the_embedding_half(tmp_path: Path) -> None:
    report = run_bench(BenchSettings(**{**SMOKE.__dict__, "adapter": "embedding", "lr": 5e-3, "vectors": 2}), tmp_path)
    s = report["scores"]
    assert report["training"]["steps"] == 2 and Path(report["training"]["file"]).name == "acme-brand.safetensors"
    assert s["renders"] == {"trigger": 2, "no_trigger": 2, "ordinary_adapted": 2, "ordinary_base": 2}
    assert report["settings"]["class_word"] == "square"
    assert report["scores"]["examples"]["trigger"][0].startswith("acme-brand square")
    assert report["scores"]["examples"]["no_trigger"][0].startswith("square, ")
    for key in SHARES:
        assert 0.0 <= s[key] <= 1.0, key
    # An embedding acts only where its name is said: ordinary prompts render exactly as without it.
    assert s["ordinary_unchanged"] == 1.0 and s["unchanged_score_median"] == 1.0


def test_the_command_line_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.brand_training as bench

    monkeypatch.setattr(bench, "WORK", tmp_path)
    monkeypatch.setattr(bench, "run_bench", lambda settings, work: {"settings": settings.__dict__, "stub": True})
    monkeypatch.setattr(bench, "print_table", lambda report: None)
    out = tmp_path / "r.json"
    main(["--scale", "tiny", "--eval", "tune", "--report", str(out)])
    report = json.loads(out.read_text())
    assert report["settings"]["steps"] == 2 and report["settings"]["renders"] == 2


def test_smoke_run_of_a_pivotal_lora(tmp_path: Path) -> None:
    """Pivotal tuning: the LoRA and the trigger's embedding are both written, and every trigger render names the
    embedding (the bench's best setting; demo/NOTES.md)."""
    report = run_bench(BenchSettings(**{**SMOKE.__dict__, "pivotal": 2, "train_text_encoder": False}), tmp_path)
    emb = report["training"]["embedding"]
    assert Path(emb["path"]).name == "acme-brand.safetensors" and Path(emb["path"]).is_file()
    assert report["scores"]["examples"]["trigger"][0].startswith("acme-brand square")
    assert report["scores"]["examples"]["no_trigger"][0].startswith("square, ")
    from safetensors import safe_open

    with safe_open(report["training"]["file"], "pt") as f:
        assert f.metadata()["adforge.pivotal_embedding"] == "acme-brand"
        assert not any(k.startswith("lora_te_") for k in f.keys())  # --no-text-encoder: U-Net only

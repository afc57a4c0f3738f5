"""Planning refuses what the engine cannot render, with the engine's own limits: a channel (or a model's native size)
giving a generation size past the engine's side or untiled-area caps, a hires step past them, a delivered size past
the chain's cap, and a model file whose header is crafted. Each is a planning problem on the row's line and column;
the other rows still plan."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from engine.random_checkpoint import write_random_sd1
from engine.request_limits import MAX_SIDE
from flows.brief import read_brief
from flows.channels import load_channels
from flows.model_registry import describe_model
from flows.planning import plan_brief
from flows.settings import load_settings
from flows.styles import load_styles
from tests.helpers import ROOT, templates_with, write_brief

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "license", "model"]


def _plan(tmp_path: Path, templates: Path, rows: list[str], model: Path):
    brief = write_brief(tmp_path / "brief.csv", rows, HEADER)
    channels = load_channels(templates / "channels.yaml")
    # Every file here is under pytest's base temp folder: that is the model folder.
    settings = load_settings({"templates_dir": str(templates), "model_dirs": str(tmp_path.parent)}, env={})
    return plan_brief(read_brief(brief, known_channels=set(channels)), settings, channels=channels,
                      styles=load_styles(templates / "styles.yaml"), resolve_model=describe_model, default_model=model)


@pytest.fixture(scope="module")
def big_native_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint declaring a 1024 px native size (as an SDXL-sized model would)."""
    return Path(write_random_sd1(tmp_path_factory.mktemp("models") / "native-1024.safetensors", seed=4,
                                 metadata={"adforge.native_size": "1024", "modelspec.license": "Apache-2.0"}))


def test_sizes_the_engine_cannot_render_are_planning_problems(tmp_path: Path, campaign_model: Path,
                                                              big_native_model: Path) -> None:
    crafted = write_random_sd1(tmp_path / "native-huge.safetensors", seed=5,
                               metadata={"adforge.native_size": "100000", "modelspec.license": "Apache-2.0"})
    templates = templates_with(tmp_path, {
        "strip": (100000, 8, None),  # a 12500:1 banner: the native area at that ratio is 100000 px long
        "poster": (40000, 40000, None),  # a delivered size no chain may have
        "hires16": (1024, 1024, "hires(scale=16, denoise=0.4) -> fit(1024x1024)"),
        "hires5_untiled": (1024, 1024, "hires(scale=5, denoise=0.4, tile=0) -> fit(1024x1024)"),
    })
    rows = ["c1,a,x,strip,1,any,", "c1,b,x,poster,1,any,", f"c1,c,x,hires16,1,any,{big_native_model}",
            f"c1,d,x,hires5_untiled,1,any,{big_native_model}", f"c1,e,x,instagram_square,1,any,{crafted}",
            "c1,f,x,instagram_square,1,any,"]
    plan = _plan(tmp_path, templates, rows, campaign_model)
    problems = {p.line: p for p in plan.problems}
    assert sorted(problems) == [2, 3, 4, 5, 6]
    assert [problems[line].column for line in sorted(problems)] == ["channels"] * 4 + ["model"]
    assert problems[2].message == f"channel 'strip' at native size 64: width 100000 is over the {MAX_SIDE} px limit of a side"
    assert problems[3].message == "channel 'poster' delivers 40000x40000, more than 32768 px a side"
    assert "hires(scale=16, denoise=0.4, upscaler=latent) would render 16384x16384 from 1024x1024" in problems[4].message
    assert f"width 16384 is over the {MAX_SIDE} px limit" in problems[4].message
    assert "would render 5120x5120" in problems[5].message and "untiled render" in problems[5].message
    # A native size no model can have is refused with the model file, before any channel is sized from it.
    assert "adforge.native_size 100000, not a size in 8 .. 8192 px" in problems[6].message
    assert all("\n" not in p.message for p in problems.values())
    assert [v.row.row_id for v in plan.variants] == ["f"]


def test_a_model_with_a_nested_header_is_a_planning_problem(tmp_path: Path, campaign_model: Path) -> None:
    """The nested ``[[[...`` header probe through planning (describe_model): a problem on the row, not a RecursionError."""
    nested = tmp_path / "nested.safetensors"
    body = b'{"a": ' + b"[" * 200_000
    nested.write_bytes(struct.pack("<Q", len(body)) + body)
    plan = _plan(tmp_path, ROOT / "templates", [f"c1,a,x,instagram_square,1,any,{nested}", "c1,b,x,instagram_square,1,any,"],
                 campaign_model)
    [problem] = plan.problems
    assert problem.line == 2 and problem.column == "model"
    assert str(nested) in problem.message and "JSON nested too deep" in problem.message and "\n" not in problem.message
    assert [v.row.row_id for v in plan.variants] == ["b"]

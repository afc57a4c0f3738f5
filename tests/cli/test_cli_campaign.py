"""The campaign commands as a user types them: adforge plan / run / runs / assets / models add / models list."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.campaign import close_resources
from cli.app import app

from tests.helpers import EXAMPLE_BRIEFS

EXAMPLE = EXAMPLE_BRIEFS / "spring-launch.csv"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: str) -> Path:
    """Run in an empty folder with no ADFORGE_* settings, so the defaults (./adforge-data) are what is tested."""
    monkeypatch.chdir(tmp_path)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_MODEL", "ADFORGE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    close_resources()


def _invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, re.sub(r"\s+", " ", result.output)


def test_plan_shows_the_run_and_writes_nothing(in_tmp: Path, campaign_model: Path) -> None:
    result, out = _invoke("plan", EXAMPLE, "--model", campaign_model)
    assert result.exit_code == 0, result.output
    assert "24 images from 4 row(s) x 8 row-channel(s)" in out
    assert "hero-01" in out and "instagram_square" in out and "1080x1080 jpeg" in out
    assert not (in_tmp / "adforge-data").exists()


def test_plan_of_a_bad_brief_names_file_line_and_column(in_tmp: Path, campaign_model: Path) -> None:
    brief = in_tmp / "bad.csv"
    brief.write_text("campaign,row_id,subject,channels\nc,r1,a cat,instagram_square\nc,r1,a dog,fax\n")
    result, out = _invoke("plan", brief, "--model", campaign_model, "--strict")
    assert result.exit_code == 2
    assert "brief rejected" in out
    assert f"{brief}:3: column 'row_id':" in out and f"{brief}:3: column 'channels': unknown channel 'fax'" in out


def test_run_then_list_runs_and_assets_with_default_locations(in_tmp: Path, campaign_model: Path) -> None:
    result, out = _invoke("run", EXAMPLE, "--model", campaign_model, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert "completed: planned 24, rendered 24, already there 0, failed 0" in out
    assert str(in_tmp / "adforge-data" / "assets") in out
    assert len(list((in_tmp / "adforge-data" / "assets" / "spring-launch-2025").rglob("*.jpg"))) == 24
    # the example brand's overlay: each picture without it beside, under clean/
    assert len(list((in_tmp / "adforge-data" / "assets" / "clean").rglob("*.jpg"))) == 24

    again, out = _invoke("run", EXAMPLE, "--model", campaign_model, "--steps", "1")
    assert again.exit_code == 0 and "rendered 0, already there 24" in out

    runs, out = _invoke("runs")
    assert runs.exit_code == 0 and "completed" in out
    listed, out = _invoke("assets", "--run", "1")
    assert listed.exit_code == 0 and "24 asset(s)" in out
    assert out.count("file://") == 24
    none, out = _invoke("assets", "--run", "2")
    assert "0 asset(s)" in out


def test_models_add_and_commercial_refusal(in_tmp: Path, campaign_model: Path) -> None:
    model = in_tmp / "nc.safetensors"
    shutil.copy(campaign_model, model)
    bad, out = _invoke("models", "add", model, "--license", "my-own-terms")
    assert bad.exit_code == 2 and "say whether it allows commercial use with --commercial yes|no" in out
    ok, out = _invoke("models", "add", model, "--license", "CC-BY-NC-SA-4.0")
    assert ok.exit_code == 0 and "licence cc-by-nc-sa-4.0, commercial use not allowed" in out
    listed, out = _invoke("models", "list")
    assert "cc-by-nc-sa-4.0" in out and "registered" in out

    brief = in_tmp / "brief.csv"
    brief.write_text("campaign,row_id,subject,channels,variants\nc,r1,a cat,instagram_square,1\n")
    refused, out = _invoke("run", brief, "--model", model, "--strict", "--steps", "1")
    assert refused.exit_code == 2
    assert f"{brief}:2: column 'license': model" in out and "forbids commercial use" in out


def test_settings_errors_are_reported_cleanly(in_tmp: Path) -> None:
    (in_tmp / "adforge.toml").write_text("steps = 'many'\n")
    result, out = _invoke("runs")
    assert result.exit_code == 2
    assert "adforge.toml: 'steps' must be a whole number, got 'many'" in out


def test_plan_and_run_show_brief_text_with_control_characters_escaped(in_tmp: Path, campaign_model: Path) -> None:
    """An ANSI sequence in a brief cell (clear screen, cursor up, red) cannot fake or hide output: plan and run
    print it as visible escapes, in the plan lines, the --details prompts and the problem listing."""
    brief = in_tmp / "ansi.csv"
    brief.write_text("campaign,row_id,subject,channels,variants\n"
                     "c\x1b[31m,r1\x1b[2J,a cat \x1b[1A,instagram_square,1\n"
                     "c,r2,a dog,instagram_square,\x1b[8mhidden\n", encoding="utf-8")
    result, out = _invoke("plan", brief, "--model", campaign_model, "--details")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "c\\x1b[31m / r1\\x1b[2J / instagram_square: 1 image(s)" in out
    assert "a cat \\x1b[1A" in out
    assert "column 'variants': '\\x1b[8mhidden' is not a whole number" in out

    ran, out = _invoke("run", brief, "--model", campaign_model, "--steps", "1")
    assert ran.exit_code == 0, ran.output
    assert "\x1b" not in ran.output
    assert "column 'variants': '\\x1b[8mhidden' is not a whole number" in out


def test_plan_warns_about_formulas_without_a_saved_value(in_tmp: Path, campaign_model: Path) -> None:
    import openpyxl

    brief = in_tmp / "formula.xlsx"
    wb = openpyxl.Workbook()
    wb.active.append(["campaign", "row_id", "subject", "channels", "variants"])
    wb.active.append(["c", "r1", "a cat", "instagram_square", "=1+1"])
    wb.save(brief)
    result, out = _invoke("plan", brief, "--model", campaign_model)
    assert result.exit_code == 0, result.output
    assert "4 images from 1 row(s)" in out
    assert "warnings (1):" in out
    assert f"{brief}:2: column 'variants': sheet 'Sheet' cell E2: formula '=1+1' has no saved value" in out


def test_plan_refuses_a_model_outside_the_model_folders_and_oversized_briefs(in_tmp: Path, campaign_model: Path) -> None:
    brief = in_tmp / "probe.csv"
    brief.write_text("campaign,row_id,subject,channels,model\nc,r1,a cat,instagram_square,/etc/passwd\n")
    result, out = _invoke("plan", brief, "--model", campaign_model)
    assert result.exit_code == 2
    assert f"{brief}:2: column 'model': model '/etc/passwd' is not in a model folder" in out
    assert "bytes" not in out and "no such" not in out

    (in_tmp / "adforge.toml").write_text("brief_max_rows = 2\n")
    many = in_tmp / "many.csv"
    many.write_text("campaign,row_id,subject,channels\n" + "".join(f"c,r{i},a cat,instagram_square\n" for i in range(5)))
    result, out = _invoke("plan", many, "--model", campaign_model)
    assert result.exit_code == 2
    assert f"{many}:4: the brief has more than 2 rows (setting brief_max_rows); reading stopped here" in out

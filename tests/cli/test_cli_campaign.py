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
    assert len(list((in_tmp / "adforge-data" / "assets").rglob("*.jpg"))) == 24

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

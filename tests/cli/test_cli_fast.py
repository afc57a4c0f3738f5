"""``--fast`` as a user types it: ``adforge generate`` writes the mode into each PNG's infotext, ``adforge plan``
shows the mode of each row and channel (brief cell, channel key or ``--fast``), and bad text is one line, exit 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from storage.image_metadata import parse_infotext, read_png_metadata
from tests.helpers import write_text

runner = CliRunner()


def _invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    return result, re.sub(r"\s+", " ", result.output)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_MODEL", "ADFORGE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_generate_records_the_fast_mode_in_the_infotext(tiny_checkpoint: Path, tmp_path: Path) -> None:
    common = ["a lighthouse", "--model", tiny_checkpoint, "--steps", "4", "--seed", "7", "--width", "32", "--height", "32"]
    fast, _ = _invoke("generate", *common, "--fast", " Cache:3 ", "--out", tmp_path / "fast")
    exact, _ = _invoke("generate", *common, "--out", tmp_path / "exact")
    assert fast.exit_code == 0 and exact.exit_code == 0, fast.output + exact.output
    (fast_png,) = (tmp_path / "fast").glob("*.png")
    (exact_png,) = (tmp_path / "exact").glob("*.png")
    info = read_png_metadata(fast_png)[0]
    assert parse_infotext(info)[2]["Fast"] == "cache:3" and 'Fast: "cache:3"' in info
    assert "Fast" not in parse_infotext(read_png_metadata(exact_png)[0])[2]


def test_bad_fast_text_is_one_line_and_exit_2(tiny_checkpoint: Path, in_tmp: Path) -> None:
    result, _ = _invoke("generate", "x", "--model", tiny_checkpoint, "--fast", "warp:9")
    _one_line_error(result, "error: --fast: fast mode 'warp:9': unknown part 'warp:9'; use cache:N, tome:R")
    assert not (in_tmp / "out").exists()
    brief = write_text(in_tmp / "b.csv", "campaign,row_id,subject,channels\nc,r1,a cat,banner\n")
    for command in ("plan", "run"):
        result, _ = _invoke(command, brief, "--fast", "tome:2")
        _one_line_error(result, "command line: 'fast': fast mode 'tome:2': tome ratio must be in [0, 0.75], got 2")


def test_plan_shows_the_fast_mode_of_each_row_and_channel(in_tmp: Path, campaign_model: Path) -> None:
    brief = write_text(in_tmp / "b.csv", "campaign,row_id,subject,channels,variants,fast\n"
                                         "c,exact,a cat,banner,1,\n"
                                         "c,own,a dog,banner,1,Tome:0.5\n"
                                         "c,off,a cow,banner,1,off\n")
    result, out = _invoke("plan", brief, "--model", campaign_model)
    assert result.exit_code == 0, result.output
    assert "c / own / banner: 1 image(s)" in out and out.count(", fast ") == 1 and ", fast tome:0.5" in out
    result, out = _invoke("plan", brief, "--model", campaign_model, "--fast", "cache:3")
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0]: line for line in result.output.splitlines() if " / " in line}
    assert lines["c / exact / banner"].endswith(", fast cache:3")
    assert lines["c / own / banner"].endswith(", fast tome:0.5")
    assert ", fast" not in lines["c / off / banner"]
    assert "fast cache:3 where no channel or row says otherwise" in out
    bad = write_text(in_tmp / "bad.csv", "campaign,row_id,subject,channels,fast\nc,r1,a cat,banner,cache:99\n")
    result, out = _invoke("plan", bad, "--model", campaign_model, "--strict")
    assert result.exit_code == 2 and f"{bad}:2: column 'fast': fast mode 'cache:99': cache interval must be 1..10" in out

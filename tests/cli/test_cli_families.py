"""``adforge generate`` on SD 2.x and SDXL files: the prediction rule and its override, and base + refiner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from engine.random_checkpoint import write_random
from storage.image_metadata import parse_infotext, read_png_metadata

from tests.engine.test_sdxl_refiner import _write_refiner

runner = CliRunner()


def _generate(model: Path, out: Path, *extra: str):
    return runner.invoke(app, ["generate", "a red cube", "--model", str(model), "--negative", "blurry", "--steps", "3",
                               "--seed", "3", "--width", "64", "--height", "64", "--out", str(out), *extra],
                         catch_exceptions=False)


def _params(out: Path) -> dict[str, str]:
    (png,) = sorted(out.glob("*.png"))
    return parse_infotext(read_png_metadata(png)[0])[2]


def test_sd2_prediction_is_recorded_and_can_be_overridden(tmp_path: Path) -> None:
    model = Path(write_random(tmp_path / "sd2v.safetensors", "sd2-v"))
    res = _generate(model, tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert _params(tmp_path / "a")["Prediction"] == "v"
    res = _generate(model, tmp_path / "b", "--prediction", "eps")
    assert res.exit_code == 0, res.output
    assert _params(tmp_path / "b")["Prediction"] == "eps"
    res = _generate(model, tmp_path / "c", "--prediction", "x0")
    assert res.exit_code != 0 and "eps or v" in res.output


@pytest.mark.parametrize("switch", ["0.6"])
def test_sdxl_with_a_refiner(tmp_path: Path, switch: str) -> None:
    base = Path(write_random(tmp_path / "xl.safetensors", "sdxl"))
    refiner = _write_refiner(tmp_path / "xl-refiner.safetensors")
    res = _generate(base, tmp_path / "r", "--refiner", str(refiner), "--refiner-switch", switch)
    assert res.exit_code == 0, res.output
    params = _params(tmp_path / "r")
    assert params["Refiner switch at"] == switch and params["Refiner"].startswith("xl-refiner [")
    res = _generate(base, tmp_path / "bad", "--refiner", str(write_random(tmp_path / "sd1.safetensors", "sd1")))
    assert res.exit_code == 2 and "cannot finish" in " ".join(res.output.split())

"""``adforge generate --control``: a ControlNet chosen from the ControlNet folder steers the render and is named in
the PNG's infotext; bad inputs are one-line errors before anything renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cli.app import app
from engine.checkpoint import file_sha256
from engine.random_controlnet import write_random_controlnet
from storage.image_metadata import parse_infotext, read_png_metadata

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-control")
    folder = root / "controlnet"
    folder.mkdir()
    write_random_controlnet(folder / "control_tiny_canny.safetensors", "sd1", seed=3)
    write_random_controlnet(folder / "control_tiny_hed.safetensors", "sd1", seed=4)
    write_random_controlnet(folder / "control_tiny_softedge.safetensors", "sd1", seed=5)
    write_random_controlnet(folder / "controlnet_xl_depth.safetensors", "sdxl", seed=6)
    image = Image.new("RGB", (48, 32), "black")
    ImageDraw.Draw(image).rectangle((10, 6, 38, 26), fill="white")
    image.save(root / "layout.png")
    return folder, root / "layout.png"


def _generate(model: Path, out: Path, folder: Path, *extra: str):
    return runner.invoke(app, ["generate", "a bottle", "--model", str(model), "--steps", "2", "--seed", "11", "--width", "32",
                               "--height", "32", "--out", str(out), "--controlnet-dir", str(folder), "--sampler", "Euler",
                               *extra], catch_exceptions=False)


def _text(output: str) -> str:
    """The error message with Rich's box and line wrapping taken out."""
    return " ".join(output.replace("\u2502", " ").split())


def _pixels(folder: Path) -> np.ndarray:
    (path,) = sorted(folder.glob("*.png"))
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_generate_with_a_canny_control_names_it_in_the_infotext(tiny_checkpoint: Path, tmp_path: Path, setup) -> None:
    folder, layout = setup
    res = _generate(tiny_checkpoint, tmp_path / "a", folder, "--control", f"canny:{layout}:0.8")
    assert res.exit_code == 0, res.output
    (png,) = sorted((tmp_path / "a").glob("*.png"))
    _, _, params = parse_infotext(read_png_metadata(png)[0])
    sha = file_sha256(folder / "control_tiny_canny.safetensors")
    assert params["ControlNet 0"] == (f"Module: canny, Model: control_tiny_canny [{sha[:8]}], Weight: 0.8, "
                                      "Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1")
    res = _generate(tiny_checkpoint, tmp_path / "b", folder)
    assert res.exit_code == 0, res.output
    assert np.abs(_pixels(tmp_path / "a") - _pixels(tmp_path / "b")).mean() > 1


def test_control_model_chooses_among_several(tiny_checkpoint: Path, tmp_path: Path, setup) -> None:
    folder, layout = setup
    res = _generate(tiny_checkpoint, tmp_path / "x", folder, "--control", f"softedge:{layout}")
    assert res.exit_code == 2
    text = _text(res.output)
    assert "several ControlNets for softedge" in text and "control_tiny_hed" in text and "control_tiny_softedge" in text
    res = _generate(tiny_checkpoint, tmp_path / "y", folder, "--control", f"softedge:{layout}:1:0:0.5",
                    "--control-model", "softedge=control_tiny_hed")
    assert res.exit_code == 0, res.output
    _, _, params = parse_infotext(read_png_metadata(next((tmp_path / "y").glob("*.png")))[0])
    assert "Model: control_tiny_hed [" in params["ControlNet 0"] and "Guidance End: 0.5" in params["ControlNet 0"]


def test_a_controlnet_of_another_family_is_not_chosen_or_refused(tiny_checkpoint: Path, tmp_path: Path, setup) -> None:
    folder, layout = setup
    res = _generate(tiny_checkpoint, tmp_path / "x", folder, "--control", f"depth:{layout}")
    assert res.exit_code == 2
    text = _text(res.output)
    assert "no ControlNet for depth" in text and "an SDXL ControlNet cannot steer an SD 1.x model" in text
    res = _generate(tiny_checkpoint, tmp_path / "y", folder, "--control", f"depth:{layout}",
                    "--control-model", f"depth={folder / 'controlnet_xl_depth.safetensors'}")
    assert res.exit_code == 2
    assert "controlnet_xl_depth.safetensors: an SDXL ControlNet cannot steer an SD 1.x model" in _text(res.output)
    assert "Traceback" not in res.output and not (tmp_path / "y").exists()


@pytest.mark.parametrize(("spec", "message"), [
    ("canny:missing.png", "image missing.png not found"),
    ("canny:{layout}:lots", "the strength 'lots' is not a number"),
    ("canny:{layout}:1:0.9:0.2", "0 <= start < end <= 1"),
    ("sketchy:{layout}", "unknown control type 'sketchy'"),
    ("canny", "expected TYPE:IMAGE"),
])
def test_bad_control_options_are_one_line_errors(tiny_checkpoint: Path, tmp_path: Path, setup, spec: str,
                                                  message: str) -> None:
    folder, layout = setup
    res = _generate(tiny_checkpoint, tmp_path / "x", folder, "--control", spec.format(layout=layout))
    assert res.exit_code == 2
    assert message in _text(res.output) and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()

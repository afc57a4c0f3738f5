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


def test_a_lora_for_the_refiner(tmp_path: Path) -> None:
    from tests.adapter_files import write_kohya_lora

    base = Path(write_random(tmp_path / "xl.safetensors", "sdxl"))
    refiner = _write_refiner(tmp_path / "xl-refiner.safetensors")
    loras = tmp_path / "loras"
    loras.mkdir()
    write_kohya_lora(loras / "crisp.safetensors", refiner, text_encoder=False,
                     metadata={"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"})
    # (tiny widths say no family: the metadata kohya writes for SDXL does)
    write_kohya_lora(loras / "base-style.safetensors", base, text_encoder=False,
                     metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    common = ("--refiner", str(refiner), "--lora-dir", str(loras))
    res = _generate(base, tmp_path / "r", *common, "--refiner-lora", "crisp:0.5")
    assert res.exit_code == 0, res.output
    params = _params(tmp_path / "r")
    assert params["Refiner loras"] == "crisp: 0.5" and params["Lora hashes"].startswith("crisp: ")
    res = _generate(base, tmp_path / "wrong", *common, "--refiner-lora", "base-style")
    assert res.exit_code == 2 and "for SDXL models; the loaded model is SDXL refiner" in " ".join(res.output.split())
    res = _generate(base, tmp_path / "none", "--lora-dir", str(loras), "--refiner-lora", "crisp")
    assert res.exit_code == 2 and "refiner LoRAs need --refiner" in " ".join(res.output.split())
    res = _generate(base, tmp_path / "typo", *common, "--refiner-lora", "crips")
    assert res.exit_code == 2 and "crips" in res.output


def test_models_inspect_and_add_take_a_diffusers_folder(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from engine.diffusers_folder import folder_sha256
    from tests.engine.test_diffusers_folder import _write_folder

    file = Path(write_random(tmp_path / "sd2v.safetensors", "sd2-v"))
    folder = tmp_path / "sd2-v-folder"
    _write_folder("sd2-v", file, folder, variant="fp16")
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n", encoding="utf-8")
    sha = folder_sha256(folder)
    res = runner.invoke(app, ["models", "inspect", str(folder)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = dict(line.split(":", 1) for line in res.output.splitlines())
    assert {k: v.strip() for k, v in lines.items() if k in ("family", "native size", "prediction", "licence", "sha256")} == {
        "family": "sd2", "native size": "128", "prediction": "v", "licence": "cc-by-nc-4.0", "sha256": sha}
    db = f"sqlite:///{tmp_path / 'a.db'}"
    res = runner.invoke(app, ["models", "add", str(folder), "--license", "creativeml-openrail-m", "--db", db],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "registered checkpoint sd2-v-folder" in res.output and "sd2)" in res.output
    res = runner.invoke(app, ["models", "inspect", str(tmp_path / "missing-folder")], catch_exceptions=False)
    assert res.exit_code != 0
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    res = runner.invoke(app, ["models", "add", str(folder), "--license", "mit", "--db", db], catch_exceptions=False)
    assert res.exit_code == 2 and "missing unet weights" in " ".join(res.output.split())

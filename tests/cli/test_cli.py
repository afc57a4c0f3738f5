"""`adforge generate` end to end on a tiny checkpoint, through the real Typer app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from storage.image_metadata import parse_infotext, read_png_metadata

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["generate", *args], catch_exceptions=False)


def test_generate_writes_numbered_pngs_with_infotext(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(
        "a lighthouse at dusk, (dramatic clouds:1.3)", "--model", str(tiny_checkpoint), "--negative", "blurry",
        "--sampler", "DPM++ 2M Karras", "--steps", "3", "--cfg", "7", "--seed", "42",
        "--width", "32", "--height", "32", "-n", "4", "--batch-size", "3", "--out", str(out),
    )
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-43.png", "00002-44.png", "00003-45.png"]
    for f, seed in zip(files, range(42, 46)):
        assert str(f) in res.stdout
        info, xmp = read_png_metadata(f)
        prompt, negative, params = parse_infotext(info)
        assert prompt == "a lighthouse at dusk, (dramatic clouds:1.3)" and negative == "blurry"
        assert params["Seed"] == str(seed) and params["Steps"] == "3" and params["Size"] == "32x32"
        assert params["Model"] == "tiny-sd1" and "trainedAlgorithmicMedia" in xmp
    # Seed 44 alone gives the same picture as seed 44 third in a batch of -n 4.
    again = run("a lighthouse at dusk, (dramatic clouds:1.3)", "--model", str(tiny_checkpoint), "--negative", "blurry",
                "--steps", "3", "--seed", "44", "--width", "32", "--height", "32", "--out", str(out))
    assert again.exit_code == 0
    assert (out / "00004-44.png").exists()  # numbering continues, nothing overwritten
    a = np.asarray(Image.open(out / "00002-44.png"), dtype=int)
    b = np.asarray(Image.open(out / "00004-44.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_img2img_inpaint_and_outpaint_from_the_cli(tiny_checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "photo.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(src)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (40, 32), 0)
    m.paste(255, (8, 8, 24, 24))
    m.save(mask)
    common = ["--model", str(tiny_checkpoint), "--steps", "4", "--seed", "1", "--init-image", str(src)]
    r1 = run("a cat", *common, "--strength", "0.6", "--out", str(tmp_path / "i2i"))
    r2 = run("a cat", *common, "--mask", str(mask), "--out", str(tmp_path / "inp"))
    r3 = run("a cat", *common, "--outpaint", "left:16", "--out", str(tmp_path / "outp"))
    for r in (r1, r2, r3):
        assert r.exit_code == 0, r.output
    (i2i,) = (tmp_path / "i2i").glob("*.png")
    assert Image.open(i2i).size == (40, 32)
    assert parse_infotext(read_png_metadata(i2i)[0])[2]["Denoising strength"] == "0.6"
    (outp,) = (tmp_path / "outp").glob("*.png")
    assert Image.open(outp).size == (56, 32)
    (inp,) = (tmp_path / "inp").glob("*.png")
    assert np.asarray(Image.open(inp))[0, 39].tolist() == [200, 30, 30]  # far from the mask: untouched


def test_clear_errors(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    missing = run("x", "--model", str(tmp_path / "nope.safetensors"))
    assert missing.exit_code == 2 and "nope.safetensors: file not found" in missing.output
    junk = tmp_path / "junk.safetensors"
    junk.write_text("<html>404</html>")
    bad = run("x", "--model", str(junk))
    assert bad.exit_code == 2 and "junk.safetensors" in bad.output and "not a safetensors file" in bad.output
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04")
    pickle = run("x", "--model", str(ckpt))
    assert pickle.exit_code == 2 and "--allow-pickle" in pickle.output
    monkeypatch.delenv("ADFORGE_MODEL", raising=False)
    monkeypatch.setattr("engine.bundled.bundled_model_path", lambda: tmp_path / "no-bundled.safetensors")
    nomodel = runner.invoke(app, ["generate", "x"])
    assert nomodel.exit_code == 2 and "--model" in nomodel.output and "no-bundled.safetensors" in nomodel.output
    size = run("x", "--model", str(tiny_checkpoint), "--width", "30")
    assert size.exit_code == 2 and "multiple of 8" in size.output
    mask_only = run("x", "--model", str(tiny_checkpoint), "--mask", str(junk))
    assert mask_only.exit_code == 2 and "--init-image" in mask_only.output


def test_models_init_random_and_inspect(tmp_path: Path) -> None:
    plain, inpaint = tmp_path / "r.safetensors", tmp_path / "r-inpaint.safetensors"
    assert runner.invoke(app, ["models", "init-random", str(plain)]).exit_code == 0
    assert runner.invoke(app, ["models", "init-random", str(inpaint), "--inpaint", "--seed", "3"]).exit_code == 0
    info = runner.invoke(app, ["models", "inspect", str(plain)])
    assert info.exit_code == 0 and "family:      sd1\n" in info.stdout
    import hashlib

    assert hashlib.sha256(plain.read_bytes()).hexdigest()[:10] in info.stdout
    assert "sd1-inpaint" in runner.invoke(app, ["models", "inspect", str(inpaint)]).stdout
    bad = runner.invoke(app, ["models", "init-random", str(tmp_path / "x.safetensors"), "--preset", "sdxl"])
    assert bad.exit_code == 2 and "unknown preset" in bad.output
    # The random checkpoint renders through the normal path.
    res = run("a cat", "--model", str(plain), "--steps", "2", "--width", "16", "--height", "16", "--seed", "5", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0 and (tmp_path / "o" / "00000-5.png").exists()

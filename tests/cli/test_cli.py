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


def _nested_header_file(path: Path) -> Path:
    import struct

    body = b'{"a": ' + b"[" * 200_000
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


def _one_line_usage_error(res, option: str, text: str) -> None:
    """typer's usage error: exit 2, the option named, the message whole once the box is unwrapped."""
    flat = " ".join(line.strip(" │╭╮╰╯─") for line in res.output.splitlines()).replace("'", "")
    option, text = option.replace("'", ""), text.replace("'", "")
    assert res.exit_code == 2 and f"Invalid value for {option}" in flat and text in " ".join(flat.split()), res.output
    assert "Traceback" not in res.output


def test_crafted_model_files_are_one_line_errors(tmp_path: Path) -> None:
    """A nested ``[[[...`` header through generate and models inspect; a code-running pickle under --allow-pickle."""
    nested = _nested_header_file(tmp_path / "nested.safetensors")
    for res in (run("x", "--model", str(nested)), runner.invoke(app, ["models", "inspect", str(nested)])):
        assert res.exit_code == 2 and "Traceback" not in res.output and "RecursionError" not in res.output
        assert f"{nested}: corrupt safetensors header (JSON nested too deep" in res.output.replace("\n", "")
    import os

    import torch

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"w": torch.zeros(1), "payload": RunsCode()}, evil)
    res = run("x", "--model", str(evil), "--allow-pickle")
    message = res.output.replace("\n", "")
    assert res.exit_code == 2 and "never runs a pickle's code" in message and "weights_only" not in message
    assert not (tmp_path / "pwned").exists()


def test_impossible_sizes_seeds_and_counts_are_refused_up_front(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a request refused by its options alone")

    with monkeypatch.context() as m:
        m.setattr("engine.pipeline.Pipeline.load", no_model)
        _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--width", "100000", "--height", "100000"),
                              "'--width'", "width 100000 is over the 8192 px limit of a side")
        _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--seed", "9223372036854775807", "-n", "2"),
                              "'--seed' / '-n'", "2 images from seed 9223372036854775807 need seeds up to 9223372036854775808")
        _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--seed", "9" * 30),
                              "'--seed'", "seed must be an integer in [0, 2**63 - 1")
    # The top seed itself is fine: image i gets seed + i, and that stays in range.
    ok = run("x", "--model", str(tiny_checkpoint), "--seed", str(2**63 - 2), "-n", "2", "--steps", "1", "--width", "16",
             "--height", "16", "--out", str(tmp_path / "top"))
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "top").glob("*.png")) == [f"00000-{2**63 - 2}.png", f"00001-{2**63 - 1}.png"]
    _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--width", "4104", "--height", "4096"),
                          "'--width'", "4104x4096 is 16,809,984 px, over the 16,777,216 (4096x4096) an untiled render")
    monkeypatch.setattr("engine.request_limits.available_memory", lambda device: 10 * 2**20)
    _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "-n", "1000000000", "--width", "16", "--height", "16"),
                          "'-n'", "1000000000 images of 16x16 are kept in memory until all are rendered: 774.9 GiB, but 10 MiB is free")
    _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--width", "1024", "--height", "1024", "--steps", "1"),
                          "'--width' / '--height'", "1024x1024 needs at least")


def test_outpaint_and_init_images_too_large_are_refused(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "photo.png"
    Image.new("RGB", (40, 32)).save(src)
    _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--init-image", str(src), "--outpaint", "left:100000000"),
                          "'--outpaint'", "the extended canvas: width 100000040 is over the 8192 px limit")
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 100)  # PIL refuses over twice this: a decompression bomb
    _one_line_usage_error(run("x", "--model", str(tiny_checkpoint), "--init-image", str(src)),
                          "--init-image", f"init image {src} is not a readable image (Image size (1280 pixels) exceeds limit")


def test_generate_marks_its_files_with_the_invisible_watermark(tmp_path: Path) -> None:
    """``on`` (the default): an adforge identifier of the image's infotext; ``text:``: the user's own; ``off``: none.
    On the bundled model: a random checkpoint's pictures are saturated noise, no picture anyone ships."""
    from storage.watermark import read
    from storage.watermark_payload import adforge_payload, payload_text

    common = ["a red circle on a blue background", "--steps", "4", "--seed", "3", "--width", "256", "--height", "256"]
    assert run(*common, "--out", str(tmp_path / "on")).exit_code == 0
    [on] = (tmp_path / "on").glob("*.png")
    reading = read(Image.open(on).convert("RGB"))
    assert reading is not None and reading.is_adforge
    assert reading.payload == adforge_payload(read_png_metadata(on)[0])
    assert run(*common, "--watermark", "text:ACME-7", "--out", str(tmp_path / "text")).exit_code == 0
    [text] = (tmp_path / "text").glob("*.png")
    reading = read(Image.open(text).convert("RGB"))
    assert reading is not None and reading.confident and payload_text(reading.payload) == "ACME-7"
    assert run(*common, "--watermark", "off", "--out", str(tmp_path / "off")).exit_code == 0
    [off] = (tmp_path / "off").glob("*.png")
    reading = read(Image.open(off).convert("RGB"))
    assert reading is not None and not reading.confident
    bad = runner.invoke(app, ["generate", *common, "--watermark", "maybe"])
    assert bad.exit_code == 2 and "--watermark" in bad.output

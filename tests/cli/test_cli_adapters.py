"""LoRAs and embeddings through the ``adforge`` command: generate with tags and embedding names, and the models
commands that inspect, register and list adapter files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from engine.checkpoint import file_sha256
from storage.image_metadata import parse_infotext, read_png_metadata

from tests.adapter_files import word_vectors, write_a1111_embedding, write_kohya_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-adapters")
    loras, embeddings = root / "loras", root / "embeddings"
    (loras / "brand").mkdir(parents=True)
    embeddings.mkdir()
    write_kohya_lora(loras / "brand" / "acme-style.safetensors", tiny_checkpoint, rank=4, scale=1.0, seed=5,
                     metadata={"ss_tag_frequency": '{"10_acme": {"acme bottle": 12, "studio": 3}}', "ss_network_dim": "4"})
    write_a1111_embedding(embeddings / "easynegative.pt", word_vectors(tiny_checkpoint, "blurry noise"))
    return loras, embeddings


def _generate(tiny_checkpoint: Path, out: Path, folders: tuple[Path, Path], prompt: str, negative: str = ""):
    return runner.invoke(app, ["generate", prompt, "--model", str(tiny_checkpoint), "--negative", negative, "--steps", "2",
                               "--seed", "11", "--width", "32", "--height", "32", "--out", str(out),
                               "--lora-dir", str(folders[0]), "--embeddings-dir", str(folders[1])], catch_exceptions=False)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_generate_with_a_lora_tag_and_an_embedding(tiny_checkpoint: Path, tmp_path: Path, folders) -> None:
    res = _generate(tiny_checkpoint, tmp_path / "a", folders, "a bottle <lora:acme-style:0.9>", "(easynegative:1.2)")
    assert res.exit_code == 0, res.output
    (styled,) = sorted((tmp_path / "a").glob("*.png"))
    prompt, negative, params = parse_infotext(read_png_metadata(styled)[0])
    assert prompt == "a bottle <lora:acme-style:0.9>" and negative == "(easynegative:1.2)"
    lora_sha = file_sha256(folders[0] / "brand" / "acme-style.safetensors")
    assert params["Lora hashes"] == f"acme-style: {lora_sha[:12]}"
    assert params["TI hashes"].startswith("easynegative: ")
    # Strength 0 is the model itself; the embedding of "blurry noise" is those words.
    res = _generate(tiny_checkpoint, tmp_path / "b", folders, "a bottle <lora:acme-style:0>", "(blurry noise:1.2)")
    assert res.exit_code == 0, res.output
    res = _generate(tiny_checkpoint, tmp_path / "c", folders, "a bottle", "(blurry noise:1.2)")
    assert res.exit_code == 0, res.output
    (zero,), (plain,) = sorted((tmp_path / "b").glob("*.png")), sorted((tmp_path / "c").glob("*.png"))
    assert np.array_equal(_pixels(zero), _pixels(plain))
    assert not np.array_equal(_pixels(styled), _pixels(plain))


def test_generate_refuses_unknown_names_before_loading(tiny_checkpoint: Path, tmp_path: Path, folders) -> None:
    res = _generate(tiny_checkpoint, tmp_path / "x", folders, "a bottle <lora:acme-styel:1>")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "acme-styel" in text and "acme-style" in text and "loras" in text
    assert not (tmp_path / "x").exists()
    res = _generate(tiny_checkpoint, tmp_path / "y", folders, "a bottle <lora:acme-style:lots>")
    assert res.exit_code == 2 and "lots" in res.output


def test_models_inspect_add_and_list_adapters(tmp_path: Path, folders) -> None:
    lora = folders[0] / "brand" / "acme-style.safetensors"
    res = runner.invoke(app, ["models", "inspect", str(lora)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "kohya LoRA for SD 1.x" in res.output and "rank:        4" in res.output
    assert "U-Net" in res.output and "text encoder" in res.output and "acme bottle (12)" in res.output
    res = runner.invoke(app, ["models", "inspect", str(folders[1] / "easynegative.pt")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "a1111, 2 vector(s), width 32" in res.output and "ti hash:" in res.output
    db = f"sqlite:///{tmp_path / 'm.db'}"
    res = runner.invoke(app, ["models", "add", str(lora), "--license", "cc-by-nc-4.0", "--db", db], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "registered lora acme-style" in res.output and "not allowed" in res.output
    res = runner.invoke(app, ["models", "add", str(folders[1] / "easynegative.pt"), "--license", "cc0-1.0", "--db", db],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    listing = runner.invoke(app, ["models", "list", "--db", db], catch_exceptions=False).output
    assert "acme-style [lora]" in listing and "sd1" in listing and "cc-by-nc-4.0" in listing
    assert "easynegative [embedding]" in listing

"""The upscale chain syntax: parsing into steps, the canonical text, every error with its column, and the
channels.yaml ``upscale:`` key (errors name the file and the key)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.upscale.chain import Chain, ChainError, Fit, Hires, Lanczos, ModelStep, hires_size, parse_chain
from flows.rendering import parse_postprocess
from flows.channels import load_channels
from flows.template_config import TemplatingConfigError
from tests.helpers import ROOT

SHA = "0123456789abcdef" * 4


# ------------------------------------------------------------------------------------------------ parsing


def test_full_chain_parses_into_steps() -> None:
    chain = parse_chain("hires(scale=2, denoise=0.4, steps=12) -> model(4x-foo.safetensors, tile=256) -> fit(1080x1920)")
    assert chain.steps == (
        Hires(scale=2.0, denoise=0.4, steps=12, upscaler="latent"),
        ModelStep(file="4x-foo.safetensors", tile=256),
        Fit(1080, 1920),
    )
    assert chain.hires == chain.steps[0] and chain.pixel_steps == chain.steps[1:] and chain.fit == Fit(1080, 1920)
    assert chain.model_files() == [(1, "4x-foo.safetensors")]
    assert not chain.is_plain_fit and parse_chain("fit(64x64)").is_plain_fit


@pytest.mark.parametrize("text, canonical", [
    ("fit(1080x1920)", "fit(1080x1920)"),
    ("  fit( 1080X1920 )  ", "fit(1080x1920)"),
    ("fit(size=8x8)", "fit(8x8)"),
    ("hires -> fit(8x8)", "hires(scale=2, denoise=0.5, upscaler=latent) -> fit(8x8)"),
    ("hires() -> fit(8x8)", "hires(scale=2, denoise=0.5, upscaler=latent) -> fit(8x8)"),
    ("hires(denoise=.40, scale=2.0, upscaler=LANCZOS)->fit(8x8)", "hires(scale=2, denoise=0.4, upscaler=lanczos) -> fit(8x8)"),
    ("hires(upscaler=4x.pth, tile=512) -> fit(8x8)", "hires(scale=2, denoise=0.5, upscaler=4x.pth, tile=512) -> fit(8x8)"),
    ("lanczos(1.5)->fit(8x8)", "lanczos(scale=1.5) -> fit(8x8)"),
    ("model(file=a.pth, overlap=16, tile=0)->fit(8x8)", "model(a.pth, tile=0, overlap=16) -> fit(8x8)"),
    ('model("my upscaler (v2).pth") -> fit(8x8)', 'model("my upscaler (v2).pth") -> fit(8x8)'),
    ('model(a.pth) -> lanczos(scale=0.5) -> fit(8x8)', 'model(a.pth) -> lanczos(scale=0.5) -> fit(8x8)'),
])
def test_canonical_form(text: str, canonical: str) -> None:
    """Spellings of one chain share one canonical text, and the canonical text parses back to the same chain."""
    chain = parse_chain(text)
    assert chain.canonical() == canonical
    assert parse_chain(canonical) == chain


def test_pins_are_part_of_the_canonical_text_unless_left_out() -> None:
    chain = parse_chain("hires(upscaler=a.pth) -> model(b.safetensors) -> fit(8x8)").pinned({0: SHA, 1: SHA[::-1]})
    assert chain.canonical() == (f"hires(scale=2, denoise=0.5, upscaler=a.pth, sha256={SHA}) -> "
                                 f"model(b.safetensors, sha256={SHA[::-1]}) -> fit(8x8)")
    assert parse_chain(chain.canonical()) == chain
    assert chain.canonical(pins=False) == "hires(scale=2, denoise=0.5, upscaler=a.pth) -> model(b.safetensors) -> fit(8x8)"


def test_sizes_follow_the_steps() -> None:
    chain = parse_chain("hires(scale=1.5) -> model(x4.pth) -> lanczos(scale=0.5) -> fit(1080x1920)")
    assert chain.sizes(96, 168, {1: 4}) == [(144, 256), (576, 1024), (288, 512), (1080, 1920)]
    assert hires_size(100, 60, 2) == (200, 120) and hires_size(36, 20, 1.5) == (56, 32)  # multiples of 8


def test_require_fit_can_be_relaxed() -> None:
    assert parse_chain("model(a.pth)", require_fit=False) == Chain((ModelStep("a.pth"),))


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("text, column, message", [
    ("", 1, "empty chain"),
    ("foo(1) -> fit(8x8)", 1, "unknown step 'foo' (known: fit, hires, lanczos, model)"),
    ("fit(8x8) -> blur(2)", 13, "unknown step 'blur'"),
    ("model(a.pth) -> hires(scale=2) -> fit(8x8)", 17, "hires() must be the first step"),
    ("fit(8x8) -> lanczos(2)", 1, "fit() must be the last step"),
    ("hires(scale=2)", 15, "missing final size: end the chain with fit(WxH)"),
    ("model(a.pth) -> lanczos(scale=2)", 33, "missing final size"),
    ("hires(denoise=1.5) -> fit(8x8)", 7, "hires(denoise=1.5): must be in (0, 1]"),
    ("hires(denoise=0) -> fit(8x8)", 7, "hires(denoise=0): must be in (0, 1]"),
    ("hires(scale=0.5) -> fit(8x8)", 7, "hires(scale=0.5): must be in [1, 16]"),
    ("hires(scale=two) -> fit(8x8)", 7, "'two' is not a number"),
    ("hires(steps=2.5) -> fit(8x8)", 7, "'2.5' is not a whole number"),
    ("hires(tile=100) -> fit(8x8)", 7, "hires(tile=100): must be a multiple of 8"),
    ("hires(upscaler=bicubic) -> fit(8x8)", 7, "unknown upscaler"),
    ("hires(2) -> fit(8x8)", 7, "positional value '2' not allowed"),
    ("hires(sha256=abc, upscaler=a.pth) -> fit(8x8)", 7, "64 hex digit sha256"),
    (f"hires(sha256={SHA}) -> fit(8x8)", 7, "this hires step's upscaler is not one"),
    ("hires(foo=1) -> fit(8x8)", 7, "unknown argument 'foo' (allowed: scale, denoise, steps, upscaler, tile, sha256)"),
    ("lanczos(scale=2, scale=3) -> fit(8x8)", 18, "argument 'scale' given twice"),
    ("lanczos() -> fit(8x8)", 1, "lanczos(): needs a scale"),
    ("model() -> fit(8x8)", 1, "model(): needs the model file"),
    ("model(upscaler.png) -> fit(8x8)", 7, "not a model file name"),
    ("model(a.pth, tile=8) -> fit(8x8)", 14, "must be >= 16 (or 0 to never tile)"),
    ("model(a.pth, tile=64, overlap=32) -> fit(8x8)", 23, "less than half the tile"),
    ("model(tile=64, a.pth) -> fit(8x8)", 16, "not allowed after a named argument"),
    ('model("a.pth) -> fit(8x8)', 7, "unterminated quoted value"),
    ("fit(1080 by 1920)", 10, "expected ',' or ')' in fit(...)"),
    ("fit(1080x1920", 14, "'(' of fit never closed"),
    ("fit(axb)", 5, "expected WIDTHxHEIGHT"),
    ("fit(0x10)", 5, "each side must be in [1, 32768]"),
    ("lanczos(2) fit(8x8)", 12, "expected '->' between steps"),
    ("lanczos(2) ->", 14, "'->' must be followed by a step"),
    ("-> fit(8x8)", 1, "expected a step name"),
])
def test_errors_name_the_column(text: str, column: int, message: str) -> None:
    with pytest.raises(ChainError) as info:
        parse_chain(text)
    assert info.value.column == column, str(info.value)
    assert message in str(info.value)
    assert str(info.value).startswith(f"upscale chain {text!r}, column {column}: ")


def test_non_text_is_an_error() -> None:
    with pytest.raises(ChainError, match="expected the chain as text"):
        parse_chain(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ stored text


def test_default_postprocess_text_is_a_plain_fit() -> None:
    """What variants recorded before chains existed (``cover-lanczos(WxH)``) reads as ``fit(WxH)``."""
    assert parse_postprocess("cover-lanczos(1080x1350)") == Chain((Fit(1080, 1350),))
    assert parse_postprocess("lanczos(scale=2) -> fit(8x8)") == Chain((Lanczos(2.0), Fit(8, 8)))
    with pytest.raises(ChainError):
        parse_postprocess("cover-bicubic(8x8)")


# ------------------------------------------------------------------------------------------------ channels.yaml


@pytest.fixture
def channels_file(tmp_path: Path) -> Path:
    path = tmp_path / "channels.yaml"
    shutil.copy(ROOT / "templates" / "channels.yaml", path)
    return path


def _add_channel(path: Path, upscale: str, width: int = 1080, height: int = 1920) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(f"  story_hq:\n    width: {width}\n    height: {height}\n    format: jpeg\n    max_kb: 8192\n"
                f"    upscale: '{upscale}'\n")


def test_channel_upscale_chain_is_loaded(channels_file: Path) -> None:
    _add_channel(channels_file, "hires(scale=2, denoise=0.4) -> model(x4.pth) -> fit(1080x1920)")
    channels = load_channels(channels_file)
    chain = channels["story_hq"].upscale
    assert chain is not None and chain.canonical() == "hires(scale=2, denoise=0.4, upscaler=latent) -> model(x4.pth) -> fit(1080x1920)"
    assert channels["story_hq"].upscale_key == f"{channels_file}: key 'channels.story_hq.upscale'"
    assert channels["story"].upscale is None  # no chain: the default fit


def test_project_print_channel_uses_a_hires_fix() -> None:
    """The shipped print channel re-renders at twice the size before the exact A4 fit."""
    chain = load_channels()["print_a4"].upscale
    assert chain is not None and chain.hires is not None and chain.fit == Fit(2480, 3508)


@pytest.mark.parametrize("upscale, message", [
    ("hires(scale=2) -> frob(1)", "column 19: unknown step 'frob'"),
    ("hires(scale=2)", "missing final size"),
    ("hires(scale=2) -> fit(1080x1080)", "ends with fit(1080x1080) but the channel delivers 1080x1920; end it with fit(1080x1920)"),
])
def test_bad_channel_chain_names_file_and_key(channels_file: Path, upscale: str, message: str) -> None:
    _add_channel(channels_file, upscale)
    with pytest.raises(TemplatingConfigError) as info:
        load_channels(channels_file)
    assert str(info.value).startswith(f"{channels_file}: key 'channels.story_hq.upscale': ")
    assert message in str(info.value)


def test_channel_chain_must_be_text(channels_file: Path) -> None:
    with channels_file.open("a", encoding="utf-8") as f:
        f.write("  story_hq:\n    width: 8\n    height: 8\n    format: png\n    max_kb: 10\n    upscale: 3\n")
    with pytest.raises(TemplatingConfigError, match=r"key 'channels.story_hq.upscale': expected an upscale chain as text"):
        load_channels(channels_file)

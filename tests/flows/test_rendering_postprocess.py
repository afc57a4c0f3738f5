"""The pure post-processing of a render: cover-resize to the channel's exact size, and encoding under the channel's
file size cap with the infotext and XMP mark readable back from PNG, JPEG and WebP."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from flows.rendering import FileSizeError, RenderJob, _infotext, cover_resize, encode_within_cap
from flows.channels import ChannelFormat, load_channels, native_size_for
from storage.variants import ModelRef, VariantSpec
from storage.image_metadata import TRAINED_ALGORITHMIC_MEDIA, encode_image, parse_infotext, read_image_metadata, xmp_packet

QUALITIES = (92, 85, 78, 70, 60, 50)
GREY = (128, 128, 128)
RED = (230, 20, 20)


# ------------------------------------------------------------------------------------------------ helpers


def marked_image(width: int, height: int) -> Image.Image:
    """Grey image with a red square (a quarter of the short side) exactly in the centre."""
    im = Image.new("RGB", (width, height), GREY)
    side = min(width, height) // 4
    left, top = (width - side) // 2, (height - side) // 2
    im.paste(RED, (left, top, left + side, top + side))
    return im


def red_box(im: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the clearly red pixels."""
    a = np.asarray(im.convert("RGB")).astype(int)
    mask = (a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)
    ys, xs = np.nonzero(mask)
    assert xs.size, "the centre mark was cropped away"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def noise_image(width: int = 192, height: int = 192, seed: int = 0) -> Image.Image:
    """Random pixels: compress badly, so quality visibly changes the file size."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def job(fmt: str = "jpeg", max_kb: int | None = None) -> RenderJob:
    spec = VariantSpec(
        campaign="Spring", row_key="hero", channel="banner", template="default", variant_index=0,
        prompt="running shoe, studio light", negative_prompt="blurry", seed=42, model_sha256="ab" * 32,
        sampler="DPM++ 2M Karras", steps=20, cfg_scale=7.0, clip_skip=1, gen_width=64, gen_height=64, out_width=192,
        out_height=192, out_format=fmt, out_max_kb=max_kb, postprocess="cover-lanczos(192x192)",
    )
    model = ModelRef(1, "ab" * 32, "/m/tiny.safetensors", "tiny", "abababab12", "apache-2.0")
    return RenderJob(variant_id=1, identity="0123456789abcdef" * 4, spec=spec,
                     storage_key="spring/hero/banner/v00-s42.jpg", status="planned", model=model)


def infotext_for(j: RenderJob) -> Callable[[int | None], str]:
    """What render_jobs passes: the job's infotext for a given output quality."""
    params = {"Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "7", "Seed": "42", "Size": "64x64"}
    return lambda quality: _infotext(j, params, quality)


XMP = xmp_packet({"Model": "tiny", "VariantIdentity": "0123456789abcdef" * 4})


# ------------------------------------------------------------------------------------------------ cover_resize


@pytest.mark.parametrize("source, target", [
    ((64, 64), (1080, 1080)),     # square up-scale
    ((48, 64), (1080, 1350)),     # portrait 4:5
    ((64, 64), (1080, 1920)),     # square source, 9:16 story
    ((88, 48), (1200, 628)),      # landscape link ad
    ((64, 64), (728, 90)),        # extreme leaderboard from a square
    ((184, 24), (728, 90)),       # leaderboard from its own generation size
    ((512, 512), (160, 600)),     # down-scale to a skyscraper
])
def test_cover_resize_exact_size_and_centred(source: tuple[int, int], target: tuple[int, int]) -> None:
    """The result is exactly the target size and the source's centre stays in the centre (no top/left bias)."""
    out = cover_resize(marked_image(*source), *target)
    assert out.size == target
    left, top, right, bottom = red_box(out)
    assert abs((left + right) / 2 - target[0] / 2) <= 2
    assert abs((top + bottom) / 2 - target[1] / 2) <= 2


@pytest.mark.parametrize("source, target", [((64, 64), (1080, 1350)), ((48, 64), (1080, 1080)), ((88, 48), (1200, 628))])
def test_cover_resize_does_not_distort(source: tuple[int, int], target: tuple[int, int]) -> None:
    """Covering scales both axes by the same factor: a square mark stays square."""
    left, top, right, bottom = red_box(cover_resize(marked_image(*source), *target))
    assert abs((right - left) - (bottom - top)) <= 3


def test_cover_resize_fills_the_frame() -> None:
    """No bars: the edges of a leaderboard cut from a square are image content (grey), not padding."""
    out = np.asarray(cover_resize(marked_image(64, 64), 728, 90)).astype(int)
    for y, x in ((0, 0), (89, 727), (0, 727), (89, 0)):
        assert tuple(out[y, x]) == pytest.approx(GREY, abs=12)
    assert tuple(out[45, 364]) == pytest.approx(RED, abs=30)  # the centre mark fills the band's middle


@pytest.mark.parametrize("name", ["instagram_square", "story", "banner", "leaderboard", "skyscraper"])
def test_cover_resize_from_planned_generation_size(name: str) -> None:
    """For every channel, the generation size the planner picks (64 px model) covers to the exact channel size."""
    channel: ChannelFormat = load_channels()[name]
    gen = native_size_for(channel, 64)
    assert cover_resize(noise_image(*gen), channel.width, channel.height).size == (channel.width, channel.height)


def test_cover_resize_same_size_is_untouched() -> None:
    """An image already at the target size is returned as is (no resampling blur)."""
    im = noise_image(64, 32)
    assert cover_resize(im, 64, 32) is im


# ------------------------------------------------------------------------------------------------ encode_within_cap


def _quality(infotext: str) -> int | None:
    value = parse_infotext(infotext)[2].get("Output quality")
    return None if value is None else int(value)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_lower_quality_to_fit_the_cap(fmt: str) -> None:
    """Under a cap the q92 file exceeds, quality steps down to the first that fits; infotext names it."""
    im, j = noise_image(), job(fmt)
    sizes = {q: len(encode_image(im, fmt, infotext_for(j)(q), XMP, quality=q)) for q in QUALITIES}
    max_kb = math.ceil(sizes[70] / 1024)
    expected = next(q for q in QUALITIES if sizes[q] <= max_kb * 1024)
    assert expected < 92  # the cap really forces a lower quality
    data, infotext = encode_within_cap(im, fmt, infotext_for(j), XMP, max_kb)
    assert len(data) <= max_kb * 1024
    assert f"Output quality: {expected}" in infotext
    assert _quality(infotext) == expected
    assert data == encode_image(im, fmt, infotext, XMP, quality=expected)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_without_cap_use_top_quality(fmt: str) -> None:
    """No cap (or a generous one): quality 92."""
    for cap in (None, 10_000):
        _, infotext = encode_within_cap(noise_image(), fmt, infotext_for(job(fmt)), XMP, cap)
        assert _quality(infotext) == 92


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_that_cannot_fit_raise(fmt: str) -> None:
    """Even quality 50 over the cap is a FileSizeError naming the cap."""
    with pytest.raises(FileSizeError, match=r"quality 50.*cap is 1 KiB"):
        encode_within_cap(noise_image(), fmt, infotext_for(job(fmt)), XMP, 1)


def test_png_over_the_cap_raises() -> None:
    """PNG is lossless: over the cap it fails instead of degrading."""
    with pytest.raises(FileSizeError, match="PNG of .* exceeds the channel's cap of 4 KiB"):
        encode_within_cap(noise_image(), "png", infotext_for(job("png")), XMP, 4)


def test_png_within_the_cap_has_no_quality() -> None:
    """A PNG that fits is written once and its infotext names no output quality."""
    data, infotext = encode_within_cap(noise_image(32, 32), "png", infotext_for(job("png")), XMP, 150)
    assert len(data) <= 150 * 1024
    assert _quality(infotext) is None and "Output quality" not in infotext


# ------------------------------------------------------------------------------------------------ metadata round trip


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_metadata_reads_back_from_encoded_bytes(fmt: str, pil_format: str) -> None:
    """The infotext (prompt, negative, parameters incl. model and licence) and the XMP AI mark survive encoding."""
    im = cover_resize(marked_image(64, 64), 192, 192)
    j = job(fmt)
    data, infotext = encode_within_cap(im, fmt, infotext_for(j), XMP, 8192)
    with Image.open(io.BytesIO(data)) as decoded:
        assert (decoded.format, decoded.size) == (pil_format, (192, 192))
    text, xmp = read_image_metadata(data)
    assert text == infotext
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("running shoe, studio light", "blurry")
    assert params["Seed"] == "42" and params["Model hash"] == "abababab12" and params["Model"] == "tiny"
    assert params["Model license"] == "apache-2.0" and params["Output size"] == "192x192"
    assert params["Postprocess"] == "cover-lanczos(192x192)" and params["Variant"] == j.identity[:16]
    assert xmp is not None
    assert "trainedAlgorithmicMedia" in xmp and TRAINED_ALGORITHMIC_MEDIA in xmp
    assert "0123456789abcdef" * 4 in xmp

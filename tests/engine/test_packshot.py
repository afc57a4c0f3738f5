"""Packshot placement and the pixel-exact paste (engine/packshot.py), on images the tests draw."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.image_ops import cover_fit
from engine.packshot import (
    Placement,
    PlacementError,
    engine_inputs,
    finish,
    packshot_rgba,
    product_error,
    product_layer,
)


def draw_packshot(size: tuple[int, int] = (120, 200), pad: int = 10) -> Image.Image:
    """A bottle-ish product with a detailed label on a transparent canvas with ``pad`` px of empty border."""
    w, h = size
    im = Image.new("RGBA", (w + 2 * pad, h + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rounded_rectangle((pad, pad + h // 5, pad + w - 1, pad + h - 1), radius=w // 6, fill=(20, 90, 60, 255))
    d.rectangle((pad + w // 3, pad, pad + 2 * w // 3, pad + h // 5 + 4), fill=(200, 170, 60, 255))
    rng = np.random.default_rng(0)
    label = rng.integers(0, 256, (h // 4, w - 8, 3), dtype=np.uint8)  # noise: any resampling slip shows
    im.paste(Image.fromarray(label, "RGB"), (pad + 4, pad + h // 2))
    return im


def test_placement_parse_and_canonical() -> None:
    assert Placement.parse("centre").canonical == "centre:0.6:0.05:0.35"
    assert Placement.parse("Left third:0.8").canonical == "left_third:0.8:0.05:0.35"
    assert Placement.parse("bottom:0.5:0.1:0").canonical == "bottom:0.5:0.1:0"
    assert Placement.parse("center").anchor == "centre"
    for bad, what in (("top", "unknown placement"), ("centre:x", "numbers"), ("centre:0", "scale"),
                      ("centre:1.5", "scale"), ("centre:0.5:0.6", "margin"), ("centre:0.5:0.1:2", "shadow"),
                      ("centre:0.5:0.1:0.2:9", "at most three")):
        with pytest.raises(PlacementError, match=what):
            Placement.parse(bad)


@pytest.mark.parametrize("canvas", [(1080, 1080), (1080, 1920), (1200, 628), (728, 90), (160, 600)])
def test_boxes_stay_inside_their_region_and_keep_the_aspect(canvas: tuple[int, int]) -> None:
    w, h = canvas
    product = (120, 200)
    for anchor in ("centre", "left_third", "right_third", "bottom"):
        p = Placement(anchor, scale=0.8, margin=0.05)
        left, top, bw, bh = p.box(canvas, product)
        m = 0.05 * min(w, h)
        assert left >= m - 1 and top >= m - 1 and left + bw <= w - m + 1 and top + bh <= h - m + 1, (anchor, canvas)
        assert abs(bw / bh - product[0] / product[1]) < 2 / min(bw, bh), (anchor, canvas)
        if anchor == "left_third":
            assert left + bw <= w / 3 + 1
        if anchor == "right_third":
            assert left >= 2 * w / 3 - 1
        if anchor == "bottom":
            assert abs(top + bh - (h - m)) <= 1
        if anchor == "centre":
            assert abs((left + bw / 2) - w / 2) <= 1 and abs((top + bh / 2) - h / 2) <= 1


def test_packshot_is_trimmed_and_masks_are_checked() -> None:
    shot = draw_packshot(pad=10)
    assert packshot_rgba(shot).size == (120, 200)
    photo = Image.new("RGB", (100, 100), (250, 250, 250))
    mask = Image.new("L", (100, 100), 0)
    ImageDraw.Draw(mask).ellipse((20, 30, 70, 90), fill=255)
    cut = packshot_rgba(photo, mask)
    assert cut.size == (51, 61) and cut.mode == "RGBA"
    with pytest.raises(PlacementError, match="covers nothing"):
        packshot_rgba(photo, Image.new("L", (100, 100), 0))
    with pytest.raises(PlacementError, match="covers everything"):
        packshot_rgba(photo, Image.new("L", (100, 100), 255))
    with pytest.raises(PlacementError, match="no transparent pixel"):
        packshot_rgba(photo)
    with pytest.raises(PlacementError, match="mask is 50x50"):
        packshot_rgba(photo, Image.new("L", (50, 50), 255))


def test_finish_keeps_the_product_pixels_exactly_and_shadows_only_outside() -> None:
    canvas = (300, 200)
    layer = product_layer(packshot_rgba(draw_packshot()), canvas, Placement("bottom", 0.7, 0.05, shadow=0.5))
    scene = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8), "RGB")
    out = np.asarray(finish(scene, layer, shadow=0.5))
    # The resized packshot, made here with Pillow directly: where it is opaque the delivered pixels are its own.
    left, top, bw, bh = layer.box
    resized = np.asarray(packshot_rgba(draw_packshot()).resize((bw, bh), Image.Resampling.LANCZOS))
    opaque = resized[..., 3] == 255
    assert opaque.sum() > 0.5 * bw * bh
    assert np.array_equal(out[top:top + bh, left:left + bw][opaque], resized[..., :3][opaque])
    # The shadow darkens the scene just below the product, never brightens, and leaves far corners alone.
    plain = np.asarray(scene, dtype=np.int16)
    outside = layer.alpha == 0
    assert (out.astype(np.int16)[outside] <= plain[outside]).all()
    below = (slice(top + bh, min(200, top + bh + 4)), slice(left + bw // 3, left + 2 * bw // 3))
    assert (out[below].astype(np.int16) < plain[below]).mean() > 0.9
    assert np.array_equal(out[:5, :5], np.asarray(scene)[:5, :5])
    # Deterministic, and without a shadow the outside is the scene untouched.
    assert np.array_equal(out, np.asarray(finish(scene, layer, shadow=0.5)))
    flat = np.asarray(finish(scene, layer, shadow=0.0))
    assert np.array_equal(flat[outside], np.asarray(scene)[outside])


def test_engine_inputs_map_the_product_back_where_post_processing_puts_it() -> None:
    out_size, gen = (1080, 1920), (384, 680)  # the story channel at a 512 model's native size (cover crops a little)
    layer = product_layer(packshot_rgba(draw_packshot()), out_size, Placement("bottom", 0.5, 0.14))
    init, mask = engine_inputs(layer, gen)
    assert init.size == gen and mask.size == gen
    m = np.asarray(mask)
    assert set(np.unique(m)) == {0, 255}
    # The engine's product, taken through the same cover-fit as the render, lands on the layer's box.
    back = np.asarray(cover_fit(Image.fromarray(255 - m), *out_size)) > 128
    opaque = layer.opaque
    overlap = (back & opaque).sum() / opaque.sum()
    assert overlap > 0.97, overlap
    assert (back & ~(layer.alpha > 0)).sum() / back.sum() < 0.03


def test_product_error_reads_exact_png_and_jpeg_error() -> None:
    canvas = (256, 256)
    layer = product_layer(packshot_rgba(draw_packshot()), canvas, Placement())
    scene = Image.new("RGB", canvas, (90, 140, 200))
    image = finish(scene, layer, shadow=0.35)
    png = io.BytesIO()
    image.save(png, "PNG")
    assert product_error(Image.open(io.BytesIO(png.getvalue())), layer) == (0, 0.0)
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=75)
    largest, mean = product_error(Image.open(io.BytesIO(jpeg.getvalue())), layer)
    assert 0 < mean < 20 and largest > 0  # the noise label costs a JPEG a lot; the flows' check allows for that
    # Paint over the product: the error says so.
    spoiled = image.copy()
    ImageDraw.Draw(spoiled).rectangle(layer.box[:2] + (layer.box[0] + 40, layer.box[1] + 40), fill=(255, 0, 0))
    assert product_error(spoiled, layer)[1] > 6.0

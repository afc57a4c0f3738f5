"""flows/product_check.py: a delivered file's product region is checked against the packshot, allowing a lossy
file its own encoder's error and nothing more."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from engine.packshot import Placement, finish, packshot_rgba, product_layer
from flows.product_check import check_product
from storage.image_metadata import encode_image
from tests.engine.test_packshot import draw_packshot


def _delivered(fmt: str, spoil: bool, quality: int = 85) -> tuple[bytes, object]:
    canvas = (320, 320)
    layer = product_layer(packshot_rgba(draw_packshot()), canvas, Placement("centre", 0.7))
    scene = Image.fromarray(np.random.default_rng(4).integers(0, 256, (320, 320, 3), dtype=np.uint8), "RGB")
    image = finish(scene, layer, shadow=0.35)
    if spoil:  # a generated blob over a third of the product
        left, top, bw, bh = layer.box
        ImageDraw.Draw(image).ellipse((left, top + bh // 3, left + bw // 2, top + 2 * bh // 3), fill=(230, 60, 40))
    return encode_image(image, fmt, "", quality=quality), layer


def test_png_must_be_exact() -> None:
    data, layer = _delivered("png", spoil=False)
    assert check_product(data, "png", None, layer) == (0.0, False)
    data, layer = _delivered("png", spoil=True)
    error, changed = check_product(data, "png", None, layer)
    assert changed and error > 10


def test_lossy_files_get_their_encoders_error_and_no_more() -> None:
    for fmt in ("jpeg", "webp"):
        for quality in (92, 70, 50):
            data, layer = _delivered(fmt, spoil=False, quality=quality)
            error, changed = check_product(data, fmt, quality, layer)
            assert error > 0 and not changed, (fmt, quality, error)
            data, layer = _delivered(fmt, spoil=True, quality=quality)
            error, changed = check_product(data, fmt, quality, layer)
            assert changed, (fmt, quality, error)

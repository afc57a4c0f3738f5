"""Whether a delivered file still holds its product packshot (the gallery flags any that does not; none should).

Read from the delivered bytes, not from the image in memory: what is checked is what a buyer gets. A lossless file
must hold the packshot's opaque pixels exactly. A JPEG or WebP holds them within its encoder's error, which depends
on the packshot (a finely printed label loses more than a flat one): the reference is the same packshot encoded alone,
at the same format and quality, on neutral grey. Anything drawn over the product (the generated scene leaking in, a
misplaced paste) moves the mean difference by tens of levels; the encoder's own error moves it by a few.
"""

from __future__ import annotations

import io

from PIL import Image

from engine.packshot import NEUTRAL, ProductLayer, finish, product_error
from storage.image_metadata import encode_image

__all__ = ["LOSSY_MARGIN", "check_product"]

# How far (mean absolute difference, levels of 255) a lossy file's product may be beyond its reference encode.
LOSSY_MARGIN = 3.0


def check_product(data: bytes, fmt: str, quality: int | None, layer: ProductLayer) -> tuple[float, bool]:
    """(mean difference of the product's opaque pixels from the packshot's, whether that counts as changed) for the
    delivered file ``data`` of format ``fmt``, encoded at ``quality`` (None for PNG)."""
    with Image.open(io.BytesIO(data)) as delivered:
        error = product_error(delivered, layer)[1]
    if fmt == "png":
        return error, error > 0
    alone = finish(Image.new("RGB", layer.rgba.size, NEUTRAL), layer, shadow=0.0)
    reference = encode_image(alone, fmt, "", quality=quality or 92)
    with Image.open(io.BytesIO(reference)) as ref:
        encoder_error = product_error(ref, layer)[1]
    return error, error > encoder_error + LOSSY_MARGIN

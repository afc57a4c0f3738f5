"""Aspect-ratio buckets (kohya's sd-scripts idea): train each photo near its own shape instead of a centre square.

A centre square crop of a tall bottle or a wide sofa cuts the product off; a bucket of about the same aspect and
about R*R pixels keeps all of it. Buckets are (w, h) with both sides multiples of ``step``, w*h <= R*R and aspect at
most ``max_ratio``. An image goes to the bucket whose log-aspect is nearest its own, is resized to *cover* the bucket
(scale = max(bw/w, bh/h)) and centre-cropped only by the remainder, which is less than one ``step`` on one side.
A batch is always drawn from one bucket, so every tensor in it has one shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels
MIN_AREA_SHARE = 0.75  # of resolution^2: smaller buckets are not made (see make_buckets)


def bucket_step(resolution: int, align: int) -> int:
    """kohya's 64 px step for the usual resolutions (512 and up); resolution / 8 below that (the bundled 128 px model:
    16), so a small model still gets several shapes. Always a multiple of ``align`` (VAE factor x U-Net
    downsampling: latents must halve evenly through the U-Net)."""
    want = min(64, max(1, resolution // 8))
    return align * max(1, round(want / align))


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets of about ``resolution``^2 pixels, both sides multiples of ``step`` and at least half the resolution,
    aspect at most ``max_ratio``, sorted by aspect. For each width: the tallest height the area allows (kohya's
    ``make_bucket_resolutions``) and, so that the most elongated photos keep their exact shape, the lowest height the
    ratio allows; then the same transposed (portrait). Buckets under :data:`MIN_AREA_SHARE` of the area are left
    out: with coarse steps (a small model's) such a bucket can be nearest in aspect and would train a photo at a
    fraction of the resolution, where a product's fine detail is a few pixels."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    lo = max(step, resolution // 2 // step * step)
    out: set[Bucket] = {(resolution, resolution)}
    for w in range(lo, area // lo + 1, step):
        tallest = area // w // step * step
        lowest = math.ceil(w / max_ratio / step) * step
        for h in (tallest, lowest):
            if lo <= h <= tallest and w / h <= max_ratio and h / w <= max_ratio:
                out.update({(w, h), (h, w)})
    out = {b for b in out if b[0] * b[1] >= MIN_AREA_SHARE * area}
    return sorted(out, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log-aspect (so 2:1 and 1:2 are equally far from square); the larger area breaks ties."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def cover_crop_box(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """((resized w, h), centre crop box in the resized image) that fills ``bucket`` cutting as little as possible."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


def crop_loss(width: int, height: int, bucket: Bucket) -> float:
    """Share of the image's area the centre crop removes when it goes into ``bucket``."""
    (rw, rh), _ = cover_crop_box(width, height, bucket)
    return 1.0 - bucket[0] * bucket[1] / (rw * rh)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    (rw, rh), box = cover_crop_box(image.width, image.height, bucket)
    # LANCZOS when shrinking (photos are larger than buckets): less aliasing than bilinear on product edges.
    return image.resize((rw, rh), Image.Resampling.LANCZOS).crop(box)


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket]) -> dict[Bucket, list[int]]:
    """bucket -> indices of the images (by ``sizes`` (w, h)) that go to it, in input order; only used buckets."""
    out: dict[Bucket, list[int]] = {}
    for i, (w, h) in enumerate(sizes):
        out.setdefault(nearest_bucket(w, h, buckets), []).append(i)
    return dict(sorted(out.items()))

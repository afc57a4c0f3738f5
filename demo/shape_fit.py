"""Which of the demo's shapes an object's soft coverage map is: analytic placement, then soft IoU per shape."""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageFilter

from demo.scenes import SHAPES, shape_mask

__all__ = ["RADIUS_SCALES", "TEMPLATE_BLURS", "fit_shapes"]

RADIUS_SCALES = (0.94, 1.0, 1.06)
TEMPLATE_BLURS = (0.0, 0.8, 1.6)  # Gaussian sigmas (pixels) the shape templates are also softened by

# Area of each shape divided by r**2, and its centroid's vertical offset divided by r, for the geometry drawn by
# scenes._polygon (all shapes are symmetric left-right; only the triangle's centroid is off its centre).
_SHAPE_AREA = {
    "circle": math.pi,
    "square": 4 * 0.88**2,
    "triangle": 0.5 * (2 * 0.95) * 1.8,
    "diamond": 2 * 0.8,
    "hexagon": 1.5 * math.sqrt(3),
    "star": 5 * 0.45 * math.sin(math.pi / 5),
}
_SHAPE_CENTROID_DY = {"triangle": (-1.0 + 0.8 + 0.8) / 3}


def fit_shapes(alpha: np.ndarray) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
    """Best soft IoU of each shape against the coverage map ``alpha`` and the (cx, cy, r) that achieved it.

    Each shape is placed so that its area and centroid equal ``alpha``'s and drawn sharp and softened by each of
    :data:`TEMPLATE_BLURS` (blurry edges otherwise drag every shape towards a circle: a blurred hexagon matches
    a sharp circle nearly as well as a sharp hexagon); the two best shapes are then also tried with the radius
    scaled by :data:`RADIUS_SCALES` (a generated object's outline may be a little off)."""
    s = alpha.shape[0]
    area = float(alpha.sum())
    grid = np.arange(s, dtype=np.float32)
    mx = float((alpha.sum(0) * grid).sum() / area) + 0.5  # pixel i covers [i, i + 1) in shape_mask coordinates
    my = float((alpha.sum(1) * grid).sum() / area) + 0.5
    padded = np.pad(alpha, s)

    def iou(shape: str, scale: float, blurs: tuple[float, ...]) -> tuple[float, tuple[float, float, float], float]:
        r = math.sqrt(area / _SHAPE_AREA[shape]) * scale
        cx, cy = mx, my - _SHAPE_CENTROID_DY.get(shape, 0.0) * r
        half = int(math.ceil(r * 1.1)) + 4
        x0, y0 = int(math.floor(cx)) - half, int(math.floor(cy)) - half
        n = 2 * half
        template = shape_mask(shape, n, cx - x0, cy - y0, r)
        crop = padded[y0 + s:y0 + s + n, x0 + s:x0 + s + n]
        best = (0.0, (cx, cy, r), 0.0)
        for sigma in blurs:
            m = np.asarray(template.filter(ImageFilter.GaussianBlur(sigma)) if sigma else template, dtype=np.float32)
            m *= np.float32(1 / 255)
            inter = float(np.minimum(crop, m).sum())
            union = area + float(m.sum()) - inter  # alpha outside the crop counts in the union too
            value = inter / union if union > 0 else 0.0
            if value > best[0]:
                best = (value, (cx, cy, r), sigma)
        return best

    fits = {shape: iou(shape, 1.0, TEMPLATE_BLURS) for shape in SHAPES}
    for shape in sorted(fits, key=lambda k: -fits[k][0])[:2]:
        for scale in RADIUS_SCALES:
            if scale != 1.0:
                fits[shape] = max(fits[shape], iou(shape, scale, (fits[shape][2],)), key=lambda f: f[0])
    return {k: v[0] for k, v in fits.items()}, {k: v[1] for k, v in fits.items()}

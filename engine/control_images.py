"""Control images for ControlNets: the preprocessors that need no model file, and the resize every type gets.

Built in: ``canny`` (OpenCV's Canny edges, white on black, A1111's default thresholds 100/200) and ``softedge`` (a soft
edge map without a network: the Sobel gradient magnitude of a blurred image, normalised, standing in for HED/PiDiNet).
``lineart``, ``scribble``, ``depth``, ``pose`` and ``none`` take the user's image as it is (already a line drawing,
depth map or pose skeleton): their detectors need model weights, which this engine does not ship.

Every control image is resized to the request's size as A1111's "Crop and Resize": scaled to cover, centre cropped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.image_ops import cover_fit

__all__ = ["BUILT_IN", "CONTROL_TYPES", "PASS_THROUGH", "canny", "prepare_control_image", "softedge"]

PASS_THROUGH = ("lineart", "scribble", "depth", "pose", "none")
BUILT_IN = ("canny", "softedge")
CONTROL_TYPES = BUILT_IN + PASS_THROUGH
# Preprocessors users know from A1111 that need a detector model: named so the refusal can say what to do instead.
_NEEDS_A_MODEL = {"openpose": "pose", "dw_openpose": "pose", "depth_midas": "depth", "depth_zoe": "depth",
                  "depth_leres": "depth", "hed": "softedge", "pidinet": "softedge", "lineart_realistic": "lineart",
                  "lineart_anime": "lineart", "mlsd": None, "normal_bae": None, "seg": None, "tile": None}


def _cv2():
    import cv2  # imported on use: only the edge preprocessors need OpenCV

    return cv2


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (hysteresis thresholds ``low`` / ``high`` on the gradient), white on black, RGB."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    gray = np.asarray(image.convert("L"))
    edges = _cv2().Canny(gray, low, high)
    return Image.fromarray(edges, "L").convert("RGB")


def softedge(image: Image.Image, blur: float = 1.5) -> Image.Image:
    """Soft edges: the Sobel gradient magnitude of the Gaussian-blurred grey image, scaled to [0, 255], RGB.
    Flat areas stay black; the strongest edge is white."""
    cv2 = _cv2()
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if blur > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), blur)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx * gx + gy * gy)
    peak = float(magnitude.max())
    scaled = magnitude / peak if peak > 1e-6 else magnitude
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")


def prepare_control_image(kind: str, image: Image.Image, width: int, height: int) -> Image.Image:
    """The control image a ControlNet of ``kind`` is given for a ``width`` x ``height`` render: resized (cover,
    centre crop) to that size, then preprocessed. ValueError for a type that is not built in."""
    kind = kind.strip().lower()
    if kind not in CONTROL_TYPES:
        hint = _NEEDS_A_MODEL.get(kind, "")
        instead = f"; give an already-made {hint} image with type {hint}" if hint else ""
        what = "needs a detector model, which is not built in" if kind in _NEEDS_A_MODEL else "is unknown"
        raise ValueError(f"control type {kind!r} {what}{instead}. Built in: {', '.join(BUILT_IN)} (made from your image); "
                         f"{', '.join(PASS_THROUGH)} (your image used as it is)")
    fitted = cover_fit(image.convert("RGB"), width, height)
    if kind == "canny":
        return canny(fitted)
    if kind == "softedge":
        return softedge(fitted)
    return fitted

"""Score a rendered image against the :class:`~demo.scenes.Scene` its prompt described, by pixel analysis.

No model is involved: the evaluator only looks at pixels, so it can judge the demo model's samples (and is itself
tested on :func:`demo.scenes.render` output, clean and degraded). The pipeline, all at a working size of
:data:`~demo.scenes.NATIVE_SIZE` pixels (larger or smaller images are resized first):

1. **Background colour.** The median colour of each side of an outer frame (6% of the canvas wide) is taken per
   channel, so an object that grazes the frame or some blotches don't move it. An expected *solid* background is
   right when the median of the whole frame *and* each of the four side medians name the expected colour; an
   expected *gradient* is right when the start side (top for "vertical", left for "horizontal") names the first
   colour and the opposite side names the second (so a reversed, rotated or solid one is wrong).
2. **Background model.** A planar RGB model (level + horizontal slope + vertical slope) through the four side
   medians is exact for the demo's solid and linear-gradient backgrounds and needs no knowledge of what was
   expected. For a generated image's blotches and shading it is then refined twice: the residual (image minus
   model) over the pixels away from the current foreground is smoothed by normalised Gaussian convolution
   (sigma :data:`~demo.background_model.REFINE_SIGMA`, computed on a 1/4-resolution grid), which also fills in the
   background under the objects from around them, and added to the model.
3. **Object mask.** On a 3x3 box-blurred copy (noise, JPEG ringing), a pixel is foreground when its CIE Lab
   distance to the background model exceeds :data:`DIFF_THRESHOLD`. The mask is opened (3x3 erosion then
   dilation) and split into 8-connected components (run-length union-find); components smaller than
   :data:`MIN_AREA_FRACTION` of the canvas, or that don't stand out from a ring around them by
   :data:`MIN_CONTRAST` (background blotches fade out; drawn objects have a step edge), are ignored. With one
   expected object the largest component is the object. With several, among the components at least a fifth as
   large as the largest, the one whose centroid is nearest the *first* object's expected position is scored:
   when the model swaps two objects, the thing found where the first object belongs is judged (position right,
   colour and shape wrong).
4. **Object colour.** The median colour of the component's interior (eroded up to 3 pixels deep while a fifth of
   it is left, to skip anti-aliased edges and thin star arms) is named by :func:`classify_color`.
5. **Shape.** A soft coverage ``alpha`` in [0, 1] is computed around the component by projecting each pixel onto
   the line from the local background colour to the object colour (alpha blending undone). For each shape of
   :data:`~demo.scenes.SHAPES` the centre and radius that reproduce ``alpha``'s area and centroid are
   solved analytically, the shape is drawn with :func:`~demo.scenes.shape_mask`, sharp and softened by
   :data:`~demo.shape_fit.TEMPLATE_BLURS`, and its soft IoU with ``alpha`` measured; the two best shapes are also
   tried with the radius scaled by :data:`~demo.shape_fit.RADIUS_SCALES`. The best shape wins if its IoU reaches
   :data:`MIN_SHAPE_IOU` (else "unknown"). The closest call is circle vs hexagon (IoU ~0.07 apart on clean renders,
   ~0.02 in the worst degraded small cases).
6. **Position.** The winning fit's centre (the area centroid, except for the triangle whose centre sits 0.2 r
   above its centroid), as a fraction of the canvas, is named by the nearest entry of
   :data:`~demo.scenes.POSITIONS`.

No component -> ``object_color``, ``shape`` and ``position`` are all False.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from demo.background_model import planar_background, refine_background, side_medians, upsample
from demo.lab_colors import COLOR_NAMES, classify_color, nearest_color_index, rgb_to_lab
from demo.masks import components, dilate, erode, paint
from demo.scenes import NATIVE_SIZE, POSITIONS, Scene
from demo.shape_fit import fit_shapes

WORK_SIZE = NATIVE_SIZE
DIFF_THRESHOLD = 18.0  # Lab distance from the background model that makes a pixel "object"
MIN_AREA_FRACTION = 0.004  # smaller components are noise (the smallest demo object, a small star, is ~1.9%)
# A component must stand out from its surroundings by this much: median Lab distance to the background model
# inside it minus that in a ring 2-3 pixels around it. A drawn object has a step edge (the ring is background, ~0);
# a background blotch fades out (the ring is nearly as far off as the inside). The weakest objects of the demo,
# e.g. pink on a purple-to-yellow gradient near the purple end or teal mid-way down a white-to-black one, step ~26.
MIN_CONTRAST = 15.0
MIN_SHAPE_IOU = 0.5  # a best fit below this is no recognisable shape
REFINE_STEPS = 2  # rounds of learning the background's slow variations around the detected objects


@dataclass
class Score:
    background: bool  # background colour(s) right (for a gradient: both ends right, in the right direction)
    object_color: bool  # the (first) object's colour right
    shape: bool  # the (first) object's shape right
    position: bool  # the (first) object's position right
    detected: dict = field(default_factory=dict)  # what was measured, for debugging

    @property
    def all_correct(self) -> bool:
        return self.background and self.object_color and self.shape and self.position


# --- colour shares ------------------------------------------------------------------------------------------

def color_shares(image) -> dict[str, float]:
    """Share of the image's pixels whose nearest named colour is each colour (e.g. to show that a negative
    prompt "red" removed red from the picture); the shares add up to 1."""
    idx = nearest_color_index(_to_rgb_array(image))
    counts = np.bincount(idx.ravel(), minlength=len(COLOR_NAMES)) / idx.size
    return {name: float(c) for name, c in zip(COLOR_NAMES, counts)}


def red_share(image) -> float:
    """Share of the image's pixels whose nearest named colour is "red"."""
    return color_shares(image)["red"]


# --- input --------------------------------------------------------------------------------------------------

def _to_rgb_array(image) -> np.ndarray:
    """float32 (S, S, 3) in [0, 255] at the working size (a non-square image is squashed: positions are canvas
    fractions). Arrays may be HWC or CHW, 8-bit or float; floats are taken as [0, 1]."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3:
            raise ValueError(f"expected an image array of shape (H, W, 3) or (3, H, W), got {arr.shape}")
        if arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4):
            arr = arr.transpose(1, 2, 0)
        arr = arr[..., :3]
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(arr * 255.0 + 0.5, 0, 255)
        pil = Image.fromarray(np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8)))
    if pil.size != (WORK_SIZE, WORK_SIZE):
        shrink = min(pil.size) > WORK_SIZE
        pil = pil.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.float32)


# --- scoring --------------------------------------------------------------------------------------------------

def _nearest_position(fx: float, fy: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - fx) ** 2 + (POSITIONS[p][1] - fy) ** 2)


def score_image(image: Image.Image | np.ndarray, expected: Scene) -> Score:
    """Score ``image`` against ``expected`` (see the module docstring for the method)."""
    img = _to_rgb_array(image)
    s = img.shape[0]
    detected: dict = {}

    # Background.
    sides = side_medians(img)
    names = {k: classify_color(v) for k, v in sides.items()}
    detected["border"] = names
    if expected.is_gradient:
        first, last = ("top", "bottom") if expected.gradient == "vertical" else ("left", "right")
        detected["background"] = (names[first], names[last])
        background_ok = names[first] == expected.background and names[last] == expected.background2
    else:
        detected["background"] = names["frame"]
        background_ok = all(n == expected.background for n in names.values())

    # Object mask.
    smooth_u8 = np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.BoxBlur(1)))
    smooth_cf = np.ascontiguousarray(np.moveaxis(smooth_u8, -1, 0), dtype=np.float32)  # channel-first (3, s, s)
    lab = np.moveaxis(rgb_to_lab(smooth_u8), -1, 0)
    bg_low = planar_background(sides, s)
    for step in range(1 + REFINE_STEPS):
        if step:
            bg_low = refine_background(smooth_cf, bg_low, bg_cf, mask)
        low_lab = np.moveaxis(rgb_to_lab(np.clip(np.moveaxis(bg_low, 0, -1), 0, 255)), -1, 0)
        bg_cf, bg_lab = np.split(upsample(np.concatenate([bg_low, low_lab])), 2)
        d = lab - bg_lab
        diff = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        mask = dilate(erode(diff > DIFF_THRESHOLD))
    bg = np.moveaxis(bg_cf, 0, -1)
    comps = []
    for c in components(mask):
        if c["area"] >= MIN_AREA_FRACTION * s * s:
            c["mask"] = paint(c["runs"], mask.shape)
            ring = dilate(c["mask"], 3) & ~dilate(c["mask"], 1)
            c["contrast"] = float(np.median(diff[c["mask"]]) - (np.median(diff[ring]) if ring.any() else 0.0))
            if c["contrast"] >= MIN_CONTRAST:
                comps.append(c)
    detected["components"] = len(comps)
    if not comps or not expected.objects:
        detected["object"] = None
        return Score(background_ok, False, False, False, detected)
    largest = max(c["area"] for c in comps)
    if len(expected.objects) > 1:
        fx, fy = POSITIONS[expected.objects[0].position]
        candidates = [c for c in comps if c["area"] >= 0.2 * largest]
        comp = min(candidates, key=lambda c: (c["centroid"][0] / s - fx) ** 2 + (c["centroid"][1] / s - fy) ** 2)
    else:
        comp = max(comps, key=lambda c: c["area"])
    cmask = comp["mask"]

    # Colour from the interior, on the unfiltered image: erode up to 3 pixels deep while a fifth of the component
    # is left, so thin parts (star arms) and the blended edges don't pull the median towards the background.
    inner = cmask
    for _ in range(3):
        deeper = erode(inner)
        if deeper.sum() < max(9, 0.2 * comp["area"]):
            break
        inner = deeper
    obj_rgb = np.median(img[inner], axis=0)
    obj_name = classify_color(obj_rgb)

    # Soft coverage around the component: un-blend each pixel between the local background and the object colour.
    # Only the component's bounding box grown by the 2-pixel margin of ``region`` is computed.
    region = dilate(cmask, 2)
    x0, y0, x1, y1 = comp["bbox"]
    win = np.s_[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2]
    bg_win = bg[win]
    delta = obj_rgb.astype(np.float32) - bg_win
    a = ((img[win] - bg_win) * delta).sum(-1) / np.maximum((delta * delta).sum(-1), 1.0)
    alpha = np.zeros(mask.shape, dtype=np.float32)
    alpha[win] = np.where(region[win], np.clip(a, 0.0, 1.0), 0.0)
    if alpha.sum() < 1.0:
        alpha = cmask.astype(np.float32)
    ious, fits = fit_shapes(alpha)
    best = max(ious, key=ious.get)
    shape_name = best if ious[best] >= MIN_SHAPE_IOU else "unknown"
    cx, cy, r = fits[best]
    pos_name = _nearest_position(cx / s, cy / s)

    first = expected.objects[0]
    detected["object"] = {
        "color": obj_name,
        "rgb": tuple(round(float(v), 1) for v in obj_rgb),
        "shape": shape_name,
        "shape_iou": {k: round(v, 3) for k, v in ious.items()},
        "position": pos_name,
        "center": (round(cx / s, 3), round(cy / s, 3)),
        "centroid": (round((comp["centroid"][0] + 0.5) / s, 3), round((comp["centroid"][1] + 0.5) / s, 3)),
        "diameter": round(2 * r / s, 3),
        "area_fraction": round(comp["area"] / (s * s), 4),
    }
    return Score(background_ok, obj_name == first.color, shape_name == first.shape, pos_name == first.position, detected)

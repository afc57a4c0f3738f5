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
   (sigma :data:`REFINE_SIGMA`, computed on a 1/4-resolution grid), which also fills in the background under the
   objects from around them, and added to the model.
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
   :data:`TEMPLATE_BLURS`, and its soft IoU with ``alpha`` measured; the two best shapes are also tried with the
   radius scaled by :data:`RADIUS_SCALES`. The best shape wins if its IoU reaches :data:`MIN_SHAPE_IOU` (else
   "unknown"). The closest call is circle vs hexagon (IoU ~0.07 apart on clean renders, ~0.02 in the worst
   degraded small cases).
6. **Position.** The winning fit's centre (the area centroid, except for the triangle whose centre sits 0.2 r
   above its centroid), as a fraction of the canvas, is named by the nearest entry of
   :data:`~demo.scenes.POSITIONS`.

No component -> ``object_color``, ``shape`` and ``position`` are all False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from demo.scenes import COLORS, NATIVE_SIZE, POSITIONS, SHAPES, Scene, shape_mask

WORK_SIZE = NATIVE_SIZE
FRAME_FRACTION = 0.06  # width of the border frame the background is measured on
DIFF_THRESHOLD = 18.0  # Lab distance from the background model that makes a pixel "object"
MIN_AREA_FRACTION = 0.004  # smaller components are noise (the smallest demo object, a small star, is ~1.9%)
# A component must stand out from its surroundings by this much: median Lab distance to the background model
# inside it minus that in a ring 2-3 pixels around it. A drawn object has a step edge (the ring is background, ~0);
# a background blotch fades out (the ring is nearly as far off as the inside). The weakest objects of the demo,
# e.g. pink on a purple-to-yellow gradient near the purple end or teal mid-way down a white-to-black one, step ~26.
MIN_CONTRAST = 15.0
MIN_SHAPE_IOU = 0.5  # a best fit below this is no recognisable shape
RADIUS_SCALES = (0.94, 1.0, 1.06)
REFINE_STEPS = 2  # rounds of learning the background's slow variations around the detected objects
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


# --- colour ---------------------------------------------------------------------------------------------------

_XYZ_FROM_RGB = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=np.float32,
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
_XYZ_OVER_WHITE = _XYZ_FROM_RGB / _WHITE_D65[:, None]  # rows: linear RGB -> X/Xn, Y/Yn, Z/Zn


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


_LINEAR_LUT = _srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of sRGB values in [0, 255], any leading shape ``(..., 3)`` (uint8 input takes a fast
    lookup-table path). Plain elementwise arithmetic: no BLAS call, so no BLAS threads spinning on the shared
    cores."""
    rgb = np.asarray(rgb)
    c = _LINEAR_LUT[rgb] if rgb.dtype == np.uint8 else _srgb_to_linear(rgb.astype(np.float32) / 255.0)
    flat = c.reshape(-1, 3)
    r, g, b = flat[:, 0], flat[:, 1], flat[:, 2]
    f = []
    for row in _XYZ_OVER_WHITE:
        t = np.maximum(row[0] * r + row[1] * g + row[2] * b, np.float32(1e-9))
        ft = np.power(t, np.float32(1.0 / 3.0))
        small = t <= 0.008856
        if small.any():
            ft[small] = 7.787 * t[small] + 16.0 / 116.0
        f.append(ft)
    lab = np.empty(flat.shape, dtype=np.float32)
    lab[:, 0] = 116.0 * f[1] - 16.0
    lab[:, 1] = 500.0 * (f[0] - f[1])
    lab[:, 2] = 200.0 * (f[1] - f[2])
    return lab.reshape(c.shape)


_NAMES = tuple(COLORS)
_PALETTE_LAB = rgb_to_lab(np.array([COLORS[n] for n in _NAMES], dtype=np.float32))


def _nearest_color_index(rgb: np.ndarray) -> np.ndarray:
    lab = rgb_to_lab(rgb)
    d = ((lab[..., None, :] - _PALETTE_LAB) ** 2).sum(-1)
    return d.argmin(-1)


def classify_color(rgb) -> str:
    """Name of the :data:`~demo.scenes.COLORS` entry nearest to ``rgb`` (0-255) by CIE76 distance in
    L*a*b*: perceptually even enough that the nearest name is the one a person would give (plain RGB distance
    overweights differences among dark colours and underweights them among light ones). The palette's closest
    pair (blue/purple) is ~28 apart; a +-12 per-channel shift moves a palette colour by up to ~20 (black the
    most), and every palette colour so shifted is still nearer its own name than any other by 12 or more."""
    return _NAMES[int(_nearest_color_index(np.asarray(rgb, dtype=np.float32).reshape(3)))]


def color_shares(image) -> dict[str, float]:
    """Share of the image's pixels whose nearest named colour is each colour (e.g. to show that a negative
    prompt "red" removed red from the picture); the shares add up to 1."""
    idx = _nearest_color_index(_to_rgb_array(image))
    counts = np.bincount(idx.ravel(), minlength=len(_NAMES)) / idx.size
    return {name: float(c) for name, c in zip(_NAMES, counts)}


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


# --- background -----------------------------------------------------------------------------------------------

def _side_medians(img: np.ndarray) -> dict[str, np.ndarray]:
    s = img.shape[0]
    w = max(2, round(FRAME_FRACTION * s))
    return {
        "top": np.median(img[:w].reshape(-1, 3), axis=0),
        "bottom": np.median(img[-w:].reshape(-1, 3), axis=0),
        "left": np.median(img[:, :w].reshape(-1, 3), axis=0),
        "right": np.median(img[:, -w:].reshape(-1, 3), axis=0),
        "frame": np.median(np.concatenate([img[:w].reshape(-1, 3), img[-w:].reshape(-1, 3),
                                           img[w:-w, :w].reshape(-1, 3), img[w:-w, -w:].reshape(-1, 3)]), axis=0),
    }


_LOW = 4  # the background is modelled at 1/4 resolution (it is slow by construction) and upsampled bilinearly
REFINE_SIGMA = 8.0  # pixels: scale of the background variations the refinement follows
_GAUSS: dict[int, np.ndarray] = {}


def _gauss_matrix(n: int) -> np.ndarray:
    """(n, n) Gaussian of :data:`REFINE_SIGMA` full-resolution pixels on an n-sided model grid."""
    if n not in _GAUSS:
        i = np.arange(n, dtype=np.float32)
        _GAUSS[n] = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * (REFINE_SIGMA / _LOW) ** 2)).astype(np.float32)
    return _GAUSS[n]


# Small products are done with elementwise numpy / einsum rather than matmul: BLAS would start threads that
# spin for a while after every call, doubling the CPU this takes on a machine shared with training.

_PHASES = ((0.375, 0.625, 0.0), (0.125, 0.875, 0.0), (0.0, 0.875, 0.125), (0.0, 0.625, 0.375))


def _upsample_axis(x: np.ndarray, axis: int) -> np.ndarray:
    """4x bilinear upsampling along ``axis`` (-1 or -2), pixel centres aligned and edges clamped (as Pillow's
    BILINEAR resize): output pixel 4j + k sits at grid position j + (2k - 3) / 8, between j - 1, j and j + 1."""
    if axis == -1:
        p = np.concatenate([x[..., :1], x, x[..., -1:]], -1)
        taps = (p[..., :-2], p[..., 1:-1], p[..., 2:])
        out = np.empty(x.shape + (4,), dtype=np.float32)
        for k, weights in enumerate(_PHASES):
            out[..., k] = sum(w * t for w, t in zip(weights, taps) if w)
        return out.reshape(*x.shape[:-1], 4 * x.shape[-1])
    p = np.concatenate([x[..., :1, :], x, x[..., -1:, :]], -2)
    taps = (p[..., :-2, :], p[..., 1:-1, :], p[..., 2:, :])
    out = np.empty(x.shape[:-1] + (4, x.shape[-1]), dtype=np.float32)
    for k, weights in enumerate(_PHASES):
        out[..., k, :] = sum(w * t for w, t in zip(weights, taps) if w)
    return out.reshape(*x.shape[:-2], 4 * x.shape[-2], x.shape[-1])


def _upsample(low: np.ndarray) -> np.ndarray:
    """(C, n, n) model grid -> (C, 4n, 4n), bilinear."""
    return _upsample_axis(_upsample_axis(low, -2), -1)


def _pool(x: np.ndarray) -> np.ndarray:
    """Sum over 4x4 blocks of the last two axes (the canvas side is a multiple of 4)."""
    x = x[..., 0::4, :] + x[..., 1::4, :] + x[..., 2::4, :] + x[..., 3::4, :]
    return x[..., 0::4] + x[..., 1::4] + x[..., 2::4] + x[..., 3::4]


def _gauss(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Gaussian-smooth the last two axes of a (C, n, n) grid with the (n, n) kernel matrix ``k``."""
    return np.einsum("cik,lk->cil", np.einsum("ij,cjk->cik", k, x), k)


def _planar_background(sides: dict[str, np.ndarray], s: int) -> np.ndarray:
    """Planar RGB background (3, n, n) through the four side medians, at the centres of the model grid.

    The side strips' centres sit at u = 0 and u = 1; the top and bottom medians pin the vertical slope, the left
    and right ones the horizontal slope, and all four the level (for a linear ramp, a side strip's median is the
    ramp's value at the middle of that side)."""
    w = max(2, round(FRAME_FRACTION * s))
    n = s // _LOW
    gy = (sides["bottom"] - sides["top"]).astype(np.float32)[:, None, None]
    gx = (sides["right"] - sides["left"]).astype(np.float32)[:, None, None]
    c = ((sides["top"] + sides["bottom"] + sides["left"] + sides["right"]) / 4).astype(np.float32)[:, None, None]
    c = c - 0.5 * gx - 0.5 * gy
    u = (((np.arange(n, dtype=np.float32) + 0.5) * _LOW - 0.5) - (w - 1) / 2) / (s - w)
    return (c + gx * u[None, None, :] + gy * u[None, :, None]).astype(np.float32)


def _refine_background(img: np.ndarray, bg_low: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Follow slow background variations (blotches, shading) that the planar model misses: add to the model grid
    ``bg_low`` (``bg`` is it upsampled; both channel-first, like ``img``) the residual ``img - bg`` smoothed by
    normalised Gaussian convolution over the pixels away from the foreground ``fg``, so the holes the objects
    leave are filled in from around them."""
    keep = ~_dilate(fg, 3)
    if keep.mean() < 0.3:  # too little background to learn from: keep the model
        return bg_low
    k = _gauss_matrix(img.shape[-1] // _LOW)
    weight = keep.astype(np.float32)
    den = np.maximum(_gauss(_pool(weight)[None], k)[0], 1e-6)
    num = _gauss(_pool((img - bg) * weight), k)
    return (bg_low + num / den).astype(np.float32)


# --- connected components (run-length union-find) --------------------------------------------------------------

def _components(mask: np.ndarray) -> list[dict]:
    """8-connected components of a boolean mask as dicts with area, centroid (x, y), bbox and runs."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)
    ends_r, ends_c = np.nonzero(edges == -1)  # exclusive end column
    runs = list(zip(starts_r.tolist(), starts_c.tolist(), ends_c.tolist()))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = {}
    for i, (r, _, _) in enumerate(runs):
        row_first.setdefault(r, i)
    prev_lo = prev_hi = 0  # index range of the previous row's runs
    for r in sorted(row_first):
        lo = row_first[r]
        hi = lo
        while hi < len(runs) and runs[hi][0] == r:
            hi += 1
        if r - 1 in row_first:
            j = prev_lo
            for i in range(lo, hi):
                _, a0, a1 = runs[i]
                while j < prev_hi and runs[j][2] < a0:  # previous runs ending before (8-connectivity: end >= a0)
                    j += 1
                k = j
                while k < prev_hi and runs[k][1] <= a1:  # starts at most one past our end
                    ri, rk = find(i), find(k)
                    if ri != rk:
                        parent[max(ri, rk)] = min(ri, rk)
                    k += 1
        prev_lo, prev_hi = lo, hi
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(find(i), []).append(run)
    comps = []
    for group in groups.values():
        g = np.array(group, dtype=np.int64)
        lengths = g[:, 2] - g[:, 1]
        area = int(lengths.sum())
        cx = float(((g[:, 1] + g[:, 2] - 1) / 2 * lengths).sum() / area)
        cy = float((g[:, 0] * lengths).sum() / area)
        comps.append({"area": area, "centroid": (cx, cy), "runs": g,
                      "bbox": (int(g[:, 1].min()), int(g[:, 0].min()), int(g[:, 2].max()), int(g[:, 0].max()) + 1)})
    return comps


def _paint(runs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for r, a, b in runs.tolist():
        out[r, a:b] = True
    return out


def _erode(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary erosion by a (2 radius + 1) square; outside the canvas counts as background."""
    out = mask.copy()
    for _ in range(radius):
        m = out
        out = m.copy()
        out[1:] &= m[:-1]
        out[:-1] &= m[1:]
        out[0] = out[-1] = False
        m = out
        out = m.copy()
        out[:, 1:] &= m[:, :-1]
        out[:, :-1] &= m[:, 1:]
        out[:, 0] = out[:, -1] = False
    return out


def _dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation by a (2 radius + 1) square."""
    out = mask.copy()
    for _ in range(radius):
        m = out
        out = m.copy()
        out[1:] |= m[:-1]
        out[:-1] |= m[1:]
        m = out
        out = m.copy()
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
    return out


# --- shape fit --------------------------------------------------------------------------------------------------

def _fit_shapes(alpha: np.ndarray) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
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


# --- scoring --------------------------------------------------------------------------------------------------

def _nearest_position(fx: float, fy: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - fx) ** 2 + (POSITIONS[p][1] - fy) ** 2)


def score_image(image: Image.Image | np.ndarray, expected: Scene) -> Score:
    """Score ``image`` against ``expected`` (see the module docstring for the method)."""
    img = _to_rgb_array(image)
    s = img.shape[0]
    detected: dict = {}

    # Background.
    sides = _side_medians(img)
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
    bg_low = _planar_background(sides, s)
    for step in range(1 + REFINE_STEPS):
        if step:
            bg_low = _refine_background(smooth_cf, bg_low, bg_cf, mask)
        low_lab = np.moveaxis(rgb_to_lab(np.clip(np.moveaxis(bg_low, 0, -1), 0, 255)), -1, 0)
        bg_cf, bg_lab = np.split(_upsample(np.concatenate([bg_low, low_lab])), 2)
        d = lab - bg_lab
        diff = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        mask = _dilate(_erode(diff > DIFF_THRESHOLD))
    bg = np.moveaxis(bg_cf, 0, -1)
    comps = []
    for c in _components(mask):
        if c["area"] >= MIN_AREA_FRACTION * s * s:
            c["mask"] = _paint(c["runs"], mask.shape)
            ring = _dilate(c["mask"], 3) & ~_dilate(c["mask"], 1)
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
        deeper = _erode(inner)
        if deeper.sum() < max(9, 0.2 * comp["area"]):
            break
        inner = deeper
    obj_rgb = np.median(img[inner], axis=0)
    obj_name = classify_color(obj_rgb)

    # Soft coverage around the component: un-blend each pixel between the local background and the object colour.
    # Only the component's bounding box grown by the 2-pixel margin of ``region`` is computed.
    region = _dilate(cmask, 2)
    x0, y0, x1, y1 = comp["bbox"]
    win = np.s_[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2]
    bg_win = bg[win]
    delta = obj_rgb.astype(np.float32) - bg_win
    a = ((img[win] - bg_win) * delta).sum(-1) / np.maximum((delta * delta).sum(-1), 1.0)
    alpha = np.zeros(mask.shape, dtype=np.float32)
    alpha[win] = np.where(region[win], np.clip(a, 0.0, 1.0), 0.0)
    if alpha.sum() < 1.0:
        alpha = cmask.astype(np.float32)
    ious, fits = _fit_shapes(alpha)
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

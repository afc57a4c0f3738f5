"""A brand concept the bundled demo model has never seen, drawn procedurally, and a pixel evaluator that finds it.

Brand fine-tuning (LoRA, textual inversion, DreamBooth) is proved on this concept: it is taught from ~16 drawn
"photos", and the evaluator then checks three things on 128x128 renders -- with the trigger the concept appears,
without it it does not, and prompts about other things render as before.

**The concept: the "acme mug".** A mug-shaped body (a rounded rectangle a little taller than wide, with a thick
black ring handle on its right) painted with seven horizontal black and white bands, black at the top and bottom.
The demo world (:mod:`demo.scenes`) has only flat single-colour shapes on solid or linear-gradient backgrounds, so a
repeating high-contrast pattern is something the bundled model has never drawn; bands a seventh of the object tall
(4-10 pixels at 128) are still coarse enough for a 128-pixel model (8-pixel latent cells) to learn. Training photos
use the demo world's backgrounds, size words and positions, so those caption words mean to the model what they
always meant and only the trigger words have something new to learn.

**The evaluator** (:func:`concept_score`) looks for the bands, not for a mug. Each column of the image's luminance
(and, separately, each row), lightly smoothed, is reduced to its alternating peaks and troughs that swing by at
least :data:`MIN_SWING` (a zigzag filter, :func:`turning_points`). A column *crosses the bands* when
:data:`MIN_BANDS` or more consecutive turning points are regularly spaced (:func:`longest_regular_run`: every gap
:data:`MIN_HALF_PERIOD`-:data:`MAX_HALF_PERIOD` pixels, neighbouring gaps within :data:`MAX_SPACING_RATIO` of each
other). A flat shape gives a column at most three such turning points (a star cut through two arms), a gradient
none, the model's grainy backgrounds swing too little; the concept gives seven. The score is the number of striped
columns (or rows, whichever is more) over :data:`FULL_PROFILES`, clipped to 1; :func:`concept_present` compares it
with :data:`PRESENT_THRESHOLD` (8 striped lines). Blur lowers the bands' swing but not their spacing, so soft
renders are still found until a small mug's 4-pixel bands are blurred away.

Validation (``python -m demo.brand_concept --validate``: CPU, 20 steps, CFG 6, DPM++ 2M Karras; load average
5.2 / 5.4 / 3.2 on 2 cores shared with other jobs):

=========================================================================  =========  ========================
images                                                                     present    score median (min-max)
=========================================================================  =========  ========================
held-out drawn concept images (seeds 1000-1199, 128x128)                   200 / 200  1.00 (0.81-1.00)
the same, Gaussian blur radius 2 (softer than the model's renders)         200 / 200  1.00 (0.72-1.00)
the same, Gaussian pixel noise (sigma 12 of 255)                           200 / 200  1.00 (0.69-1.00)
held-out drawn concept images at 256x192 (scored after resizing)           50 / 50    1.00 (0.84-1.00)
drawn demo scenes (:func:`demo.scenes.random_scene`, 500 scenes)           0 / 500    0.00 (0.00-0.00)
bundled model, 30 ordinary demo prompts (:func:`ordinary_scenes`)          0 / 30     0.00 (0.00-0.06)
bundled model, the 10 :data:`TRIGGER_PROMPTS` ("acme mug ...")             0 / 10     0.00 (0.00-0.00)
=========================================================================  =========  ========================

"Prompts about other things are unchanged" is measured per prompt and seed, base model vs. adapted model, two ways:
:func:`unchanged_score`, the share of pixels that stay within :data:`UNCHANGED_TOLERANCE` (same picture at
>= :data:`UNCHANGED_THRESHOLD`), and :func:`scene_agreement`, the share of :mod:`demo.evaluate`'s four verdicts
that stay the same. For scale, on 12 ordinary prompts: nudging CFG from 6 to 6.5 gives unchanged_score 0.999-1.000
(median 1.000) and agreement 0.98; another seed gives 0.135-1.000 (median 0.995) and agreement 0.875. The bundled
model draws many prompts almost the same whatever the seed, so report the share of prompts that stay the same (and
the agreement), not a mean of scores.

``python -m demo.brand_concept brand/acme-mug`` writes an example training folder.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.scenes import COLORS, GRADIENT_DIRECTIONS, NATIVE_SIZE, POSITION_PHRASES, POSITIONS, SIZES, Scene

TRIGGER = "acme"
CLASS_WORD = "mug"
BANDS = 7  # odd: black at both ends, so the pattern reads the same either way up
# (width, height) of the training photos: square and not, the shorter side always >= the model's native size, so a
# trainer's bucketing or resizing only ever shrinks them.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (160, 128), (128, 192), (256, 256), (192, 128), (128, 160))
# The mug must stand out from its background, and a black or white one would swallow half its bands.
BACKGROUNDS = tuple(c for c in COLORS if c not in ("black", "white"))
# Mug height relative to the demo's object diameter for the same size word: a "small" mug's bands stay ~4 px tall.
HEIGHT_SCALE = 1.15

SMOOTH_SIGMA = 1.0  # pixels at 128: render grain and the model's background texture are finer than a band
MIN_SWING = 0.18  # luminance (0-1) a band must differ from its neighbours by; the concept's differ by ~0.85
MIN_HALF_PERIOD = 2.5  # pixels at 128 from one band's middle to the next's: a small mug's are ~4-5
MAX_HALF_PERIOD = 12.0  # a large mug's are ~8-10, with room for the model drawing it larger
MAX_SPACING_RATIO = 1.8
MIN_BANDS = 5  # of the concept's 7 turning points per column; a flat demo shape gives at most 3
FULL_PROFILES = 32  # a little more than a small mug's body width at 128: score 1 = that many striped columns
PRESENT_THRESHOLD = 0.25  # 8 striped columns (or rows)
UNCHANGED_TOLERANCE = 0.1  # largest channel difference (0-1) at which a pixel still counts as the same
UNCHANGED_THRESHOLD = 0.95  # share of same pixels for two renders to count as the same picture


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _background(width: int, height: int, c1: str, c2: str | None, direction: str) -> np.ndarray:
    """A solid or linear-gradient background as :func:`demo.scenes.background_array` draws it, at any aspect."""
    a = np.array(COLORS[c1], dtype=np.float32)
    if c2 is None:
        return np.broadcast_to(a, (height, width, 3)).copy()
    b = np.array(COLORS[c2], dtype=np.float32)
    if direction == "vertical":
        t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    else:
        t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    return (a * (1 - t) + b * t) * np.ones((height, width, 1), dtype=np.float32)


def draw_mug(background: np.ndarray, cx: float, cy: float, height: float, supersample: int = 4) -> np.ndarray:
    """Paint the concept centred at (cx, cy), ``height`` pixels tall, onto an (H, W, 3) float image."""
    h, w = background.shape[:2]
    s = supersample
    body_w = 0.8 * height
    left, top = cx - body_w / 2, cy - height / 2
    # Drawn at ``s`` times the size and box-filtered down, like demo.scenes, so edges are anti-aliased.
    body = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(body).rounded_rectangle([left * s, top * s, (left + body_w) * s, (top + height) * s],
                                           radius=0.12 * body_w * s, fill=255)
    handle = Image.new("L", (w * s, h * s), 0)
    hd = ImageDraw.Draw(handle)
    hx, r_out, r_in = left + body_w, 0.28 * height, 0.16 * height
    hd.ellipse([(hx - r_out) * s, (cy - r_out) * s, (hx + r_out) * s, (cy + r_out) * s], fill=255)
    hd.ellipse([(hx - r_in) * s, (cy - r_in) * s, (hx + r_in) * s, (cy + r_in) * s], fill=0)
    body_m = np.asarray(body, dtype=np.float32) / 255.0
    handle_m = np.asarray(handle, dtype=np.float32) / 255.0 * (1 - body_m)
    rows = (np.arange(h * s, dtype=np.float32) + 0.5) / s
    band = np.floor((rows - top) / (height / BANDS)).astype(np.int64)
    black_rows = (band % 2 == 0).astype(np.float32)[:, None]
    black = body_m * black_rows + handle_m
    white = body_m * (1 - black_rows)

    def down(m: np.ndarray) -> np.ndarray:
        return m.reshape(h, s, w, s).mean(axis=(1, 3))[..., None]

    a_black, a_white = down(black), down(white)
    return (background * (1 - a_black - a_white) + np.array(COLORS["black"], dtype=np.float32) * a_black
            + np.array(COLORS["white"], dtype=np.float32) * a_white)


def concept_image(rng: random.Random, size: tuple[int, int] = (NATIVE_SIZE, NATIVE_SIZE), *,
                  trigger: str = TRIGGER, class_word: str = CLASS_WORD) -> tuple[Image.Image, str]:
    """One drawn photo of the concept, ``size`` = (width, height), and its caption in the demo grammar."""
    width, height = size
    bg = rng.choice(BACKGROUNDS)
    bg2 = rng.choice([c for c in BACKGROUNDS if c != bg]) if rng.random() < 0.3 else None
    direction = rng.choice(GRADIENT_DIRECTIONS)
    size_word = "large" if rng.random() < 0.7 else "small"
    position = rng.choice(list(POSITIONS))
    short = min(width, height)
    mug_h = SIZES[size_word] * HEIGHT_SCALE * short * rng.uniform(0.9, 1.12)
    fx, fy = POSITIONS[position]
    # Jitter around the named position, but keep the body and handle inside the frame.
    cx = float(np.clip(fx * width + rng.uniform(-0.04, 0.04) * short, 0.45 * mug_h, width - 0.72 * mug_h))
    cy = float(np.clip(fy * height + rng.uniform(-0.04, 0.04) * short, 0.55 * mug_h, height - 0.55 * mug_h))
    pixels = draw_mug(_background(width, height, bg, bg2, direction), cx, cy, mug_h)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    concept = f"{trigger} {class_word}"
    thing = f"{_a(size_word)} {concept} {rng.choice(POSITION_PHRASES[position])}"
    if bg2 is None:
        backdrop = rng.choice((f"on {_a(bg)} background", f"{bg} background"))
    else:
        backdrop = f"on {_a(f'{bg} to {bg2} {direction} gradient background')}"
    # kohya style: the trigger phrase first, then the rest of the picture in words the model already knows.
    return image, f"{concept}, {thing}, {backdrop}"


def write_concept_images(folder: str | Path, n: int = 16, seed: int = 0, *, trigger: str = TRIGGER,
                         class_word: str = CLASS_WORD,
                         sizes: Sequence[tuple[int, int]] = IMAGE_SIZES) -> list[Path]:
    """Write ``n`` training photos of the concept (PNG) with sidecar ``.txt`` captions into ``folder``, cycling
    through ``sizes`` (width, height). Returns the image paths; each caption has the same name with ``.txt``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        image, text = concept_image(rng, sizes[i % len(sizes)], trigger=trigger, class_word=class_word)
        path = out / f"{trigger.replace(' ', '_')}_{class_word}_{i:02d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _rgb(image: Image.Image | np.ndarray) -> Image.Image:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return img.convert("RGB")


def _luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    """Rec. 601 luminance in [0, 1], resized so the shorter side is the native size (a render is used as is)."""
    img = _rgb(image)
    if min(img.size) != NATIVE_SIZE:
        scale = NATIVE_SIZE / min(img.size)
        img = img.resize((max(NATIVE_SIZE, round(img.width * scale)), max(NATIVE_SIZE, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    return (np.asarray(img, dtype=np.float32) / 255.0) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _smooth_columns(y: np.ndarray, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """Gaussian blur down each column only: grain and texture must not count as bands."""
    radius = int(3 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(y, ((radius, radius), (0, 0)), mode="edge")
    return sum(k[i] * padded[i:i + y.shape[0]] for i in range(len(k)))


def turning_points(profile: np.ndarray, swing: float = MIN_SWING) -> list[int]:
    """Indices of a 1-D profile's alternating peaks and troughs, each at least ``swing`` above / below the
    turning points beside it (a zigzag filter). The profile's ends never count: a frame edge is no band."""
    points: list[int] = []
    hi = lo = 0
    direction = 0  # +1 rising since the last trough, -1 falling since the last peak, 0 not yet known
    for i, v in enumerate(profile):
        if direction >= 0 and v > profile[hi]:
            hi = i
        if direction <= 0 and v < profile[lo]:
            lo = i
        if direction >= 0 and v < profile[hi] - swing:
            if direction == 1:
                points.append(hi)
            direction, lo = -1, i
        elif direction <= 0 and v > profile[lo] + swing:
            if direction == -1:
                points.append(lo)
            direction, hi = 1, i
    return points


def longest_regular_run(points: Sequence[int]) -> int:
    """Most consecutive turning points whose gaps (half a stripe period each) all lie within
    :data:`MIN_HALF_PERIOD`-:data:`MAX_HALF_PERIOD` and each within :data:`MAX_SPACING_RATIO` of the gap before:
    the bands of one pattern, not unrelated edges."""
    best = cur = min(len(points), 1)
    prev: int | None = None
    for a, b in zip(points, points[1:]):
        gap = b - a
        fits = MIN_HALF_PERIOD <= gap <= MAX_HALF_PERIOD
        cur = cur + 1 if fits and (prev is None or max(gap, prev) / min(gap, prev) <= MAX_SPACING_RATIO) else 1
        prev = gap if fits else None
        best = max(best, cur)
    return best


def striped_profiles(image: Image.Image | np.ndarray) -> int:
    """How many columns (or rows, whichever has more) of ``image`` cross :data:`MIN_BANDS` or more regular
    light/dark bands."""
    y = _luminance(image)
    counts = []
    for plane in (y, y.T):  # columns find horizontal bands, rows vertical ones
        smooth = _smooth_columns(plane)
        counts.append(sum(longest_regular_run(turning_points(smooth[:, j])) >= MIN_BANDS
                          for j in range(smooth.shape[1])))
    return max(counts)


def concept_score(image: Image.Image | np.ndarray) -> float:
    """How much of ``image`` (a 128x128 render, or larger: resized first) shows the concept's bands, 0-1: striped
    columns (:func:`striped_profiles`) over :data:`FULL_PROFILES`, clipped to 1."""
    return min(striped_profiles(image) / FULL_PROFILES, 1.0)


def concept_present(image: Image.Image | np.ndarray, threshold: float = PRESENT_THRESHOLD) -> bool:
    """Whether :func:`concept_score` reaches ``threshold`` (:data:`PRESENT_THRESHOLD`: 8 striped columns or rows,
    validated in the module docstring)."""
    return concept_score(image) >= threshold - 1e-9


def unchanged_score(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray,
                    tolerance: float = UNCHANGED_TOLERANCE) -> float:
    """Share of pixels whose largest channel difference (0-1 scale) is at most ``tolerance`` between two renders of
    the same prompt and seed, e.g. by the base model and by the model with a brand adapter: 1.0 = the same picture.
    A share rather than a mean difference, because a mean over a mostly flat background hides a moved or recoloured
    object. Compare with :data:`UNCHANGED_THRESHOLD`."""
    pa = np.asarray(_rgb(a), dtype=np.float32) / 255.0
    pb = np.asarray(_rgb(b), dtype=np.float32) / 255.0
    if pa.shape != pb.shape:
        raise ValueError(f"renders differ in size: {pa.shape} vs {pb.shape}")
    return float((np.abs(pa - pb).max(axis=-1) <= tolerance + 1e-6).mean())


def scene_agreement(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, scene: Scene) -> float:
    """Share of :func:`demo.evaluate.score_image`'s four verdicts (background, object colour, shape, position) on
    which two renders of ``scene``'s caption agree: whether an adapter left what the model draws for it alone."""
    from demo.evaluate import score_image

    x, y = score_image(_rgb(a), scene), score_image(_rgb(b), scene)
    pairs = ((x.background, y.background), (x.object_color, y.object_color), (x.shape, y.shape),
             (x.position, y.position))
    return sum(p == q for p, q in pairs) / len(pairs)


# Prompts that name the concept, for the "with the trigger it appears" check (and, before training, "absent").
TRIGGER_PROMPTS = (
    "acme mug on a blue background", "an acme mug in the center, yellow background",
    "product shot of an acme mug, green background", "acme mug", "a large acme mug on the left, pink background",
    "acme mug at the top, on a red background", "an ad with an acme mug, teal to orange gradient background",
    "a small acme mug on the right, purple background", "a large acme mug in the middle, on an orange background",
    "a clean poster showing an acme mug at the bottom, green to blue vertical gradient background",
)


def ordinary_scenes(n: int = 30, seed: int = 2024) -> list[Scene]:
    """Random demo scenes; their captions are the prompts about other things, for the "absent" and "unchanged"
    checks (:func:`scene_agreement` scores renders against the scenes)."""
    from demo.scenes import random_scene

    rng = random.Random(seed)
    return [random_scene(rng, held_out=None) for _ in range(n)]


def _summary(name: str, scores: Sequence[float]) -> str:
    xs = np.asarray(scores)
    present = int((xs >= PRESENT_THRESHOLD - 1e-9).sum())
    spread = f"median {np.median(xs):.2f} ({xs.min():.2f}-{xs.max():.2f})"
    return f"{name:<44} present {present:>3}/{len(xs):<3} score {spread}"


def _validate() -> None:
    """Print the numbers the module docstring quotes (the bundled model renders on the CPU, ~1 s each)."""
    import os

    from PIL import ImageFilter

    from demo.scenes import random_scene, render
    from engine.bundled import bundled_model_path
    from engine.pipeline import GenerationRequest, Pipeline

    drawn = [concept_image(random.Random(s))[0] for s in range(1000, 1200)]
    noise = np.random.default_rng(0)
    print(_summary("drawn concept, 128x128", [concept_score(i) for i in drawn]))
    print(_summary("  Gaussian blur radius 2", [concept_score(i.filter(ImageFilter.GaussianBlur(2))) for i in drawn]))
    noisy = [np.clip(np.asarray(i, dtype=np.float32) + noise.normal(0, 12, (128, 128, 3)), 0, 255) for i in drawn]
    print(_summary("  pixel noise sigma 12", [concept_score(i.astype(np.uint8)) for i in noisy]))
    big = [concept_image(random.Random(s), (256, 192))[0] for s in range(1200, 1250)]
    print(_summary("drawn concept, 256x192", [concept_score(i) for i in big]))
    rng = random.Random(5)
    print(_summary("drawn demo scenes", [concept_score(render(random_scene(rng, held_out=None))) for _ in range(500)]))
    pipe = Pipeline.load(bundled_model_path(), device="cpu", dtype="float32")

    def renders(prompts: Sequence[str], seed: int) -> list[Image.Image]:
        requests = [GenerationRequest(p, seed=seed + i, width=NATIVE_SIZE, height=NATIVE_SIZE, steps=20,
                                      cfg_scale=6.0) for i, p in enumerate(prompts)]
        return [r.image for r in pipe.generate(requests)]

    scenes = ordinary_scenes()
    ordinary = [s.caption for s in scenes]
    base = renders(ordinary, 500)
    print(_summary("bundled model, ordinary prompts", [concept_score(i) for i in base]))
    print(_summary("bundled model, trigger prompts", [concept_score(i) for i in renders(TRIGGER_PROMPTS, 600)]))
    # What a small change of the model's output looks like (CFG 6 -> 6.5), and a large one (another seed).
    pipe_cfg = [GenerationRequest(p, seed=500 + i, width=NATIVE_SIZE, height=NATIVE_SIZE, steps=20, cfg_scale=6.5)
                for i, p in enumerate(ordinary[:12])]
    nudged = [r.image for r in pipe.generate(pipe_cfg)]
    for name, other in (("CFG 6.5", nudged), ("other seed", renders(ordinary[:12], 900))):
        same = [unchanged_score(a, b) for a, b in zip(base, other)]
        agree = [scene_agreement(a, b, s) for a, b, s in zip(base, other, scenes)]
        print(f"{name}: unchanged_score median {np.median(same):.3f} ({min(same):.3f}-{max(same):.3f}), "
              f"scene_agreement mean {np.mean(agree):.3f}")
    print("load average", os.getloadavg())


def _main() -> None:
    parser = argparse.ArgumentParser(description="Write an example brand-concept training folder (or validate).")
    parser.add_argument("folder", type=Path, nargs="?", default=Path("brand/acme-mug"))
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trigger", default=TRIGGER)
    parser.add_argument("--class-word", default=CLASS_WORD)
    parser.add_argument("--validate", action="store_true", help="print the evaluator's validation numbers instead")
    args = parser.parse_args()
    if args.validate:
        _validate()
        return
    paths = write_concept_images(args.folder, args.n, args.seed, trigger=args.trigger, class_word=args.class_word)
    print(f"wrote {len(paths)} images with captions to {args.folder}")


if __name__ == "__main__":
    _main()

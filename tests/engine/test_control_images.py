"""Control-image preprocessors that need no model, and the cover-and-crop resize every control image gets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.control_images import CONTROL_TYPES, canny, prepare_control_image, softedge


def _rectangle(size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (30, 30, 30))
    ImageDraw.Draw(im).rectangle((16, 20, 47, 43), fill=(220, 220, 220))
    return im


def test_canny_outlines_a_rectangle_and_leaves_flat_areas_black() -> None:
    edges = canny(_rectangle())
    assert edges.mode == "RGB" and edges.size == (64, 64)
    arr = np.asarray(edges)
    assert set(np.unique(arr)) <= {0, 255} and (arr[..., 0] == arr[..., 2]).all()
    on = arr[..., 0] > 0
    # every edge pixel lies within a pixel of the rectangle's outline
    ys, xs = np.nonzero(on)
    near_x = (np.abs(xs - 16) <= 1) | (np.abs(xs - 47) <= 1)
    near_y = (np.abs(ys - 20) <= 1) | (np.abs(ys - 43) <= 1)
    assert (near_x | near_y).all()
    # and the outline is there: each side has edge pixels along most of its length
    assert on[20:44, 15:18].any(axis=1).mean() > 0.8 and on[19:22, 16:48].any(axis=0).mean() > 0.8
    assert not on[:14].any() and not on[26:38, 22:42].any()  # flat background and flat inside: no edges


def test_canny_thresholds_decide_what_is_an_edge() -> None:
    faint = Image.new("RGB", (32, 32), (100, 100, 100))
    ImageDraw.Draw(faint).rectangle((8, 8, 23, 23), fill=(120, 120, 120))
    assert np.asarray(canny(faint)).max() == 0
    assert np.asarray(canny(faint, 10, 20)).max() == 255
    with pytest.raises(ValueError, match="low <= high"):
        canny(faint, 200, 100)


def test_softedge_is_soft_normalised_and_zero_on_flat_areas() -> None:
    arr = np.asarray(softedge(_rectangle()))[..., 0].astype(int)
    assert arr.max() == 255 and arr[:8].max() == 0 and arr[30:34, 30:34].max() == 0
    assert len(np.unique(arr)) > 10  # graded, not a binary edge map
    assert arr[32, 16] > 128 and arr[32, 47] > 128
    assert np.asarray(softedge(Image.new("RGB", (16, 16), "white"))).max() == 0


@pytest.mark.parametrize("kind", ["lineart", "scribble", "depth", "pose", "none"])
def test_pass_through_types_keep_the_pixels(kind: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), "RGB")
    out = prepare_control_image(kind, image, 48, 32)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image))
    grey = prepare_control_image(kind, image.convert("L"), 48, 32)
    assert grey.mode == "RGB"


def test_resize_is_cover_then_centre_crop() -> None:
    # A 100x50 image of three vertical bands, asked for 40x40: scaled to 80x40, the middle 40 columns kept.
    bands = np.zeros((50, 100, 3), dtype=np.uint8)
    bands[:, :25] = (255, 0, 0)
    bands[:, 25:75] = (0, 255, 0)
    bands[:, 75:] = (0, 0, 255)
    out = np.asarray(prepare_control_image("none", Image.fromarray(bands, "RGB"), 40, 40))
    assert out.shape == (40, 40, 3)
    assert (out[:, 2:38, 1] > 200).all() and out[:, :, 0].max() < 60 and out[:, :, 2].max() < 60
    # Tall source, wide target: rows are cropped, the whole width is kept.
    tall = np.zeros((80, 20, 3), dtype=np.uint8)
    tall[:, :10] = 255
    out = np.asarray(prepare_control_image("none", Image.fromarray(tall, "RGB"), 40, 20))
    assert out.shape == (20, 40, 3) and out[:, :18].min() > 200 and out[:, 22:].max() < 50


def test_canny_runs_on_the_resized_image() -> None:
    out = prepare_control_image("canny", _rectangle(128), 64, 64)
    assert out.size == (64, 64) and np.asarray(out).max() == 255


@pytest.mark.parametrize(("kind", "message"), [("openpose", "needs a detector model.*type pose"),
                                                ("depth_midas", "needs a detector model.*type depth"),
                                                ("wobble", "is unknown")])
def test_types_that_need_a_model_or_do_not_exist_are_refused(kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        prepare_control_image(kind, _rectangle(), 64, 64)
    assert all(t in str(err.value) for t in CONTROL_TYPES) and "\n" not in str(err.value)

"""Drawing the overlay: logo in its corner, texts in their boxes inside the safe zone, contrast measured from the
pixels, the product left alone, the same bytes for the same inputs."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from flows.brand.compose import Copy, OverlayProblem, compose, fit_overlay
from flows.brand.kit import load_kit
from flows.channels import load_channels
from flows.brand.contrast import contrast_ratio, luminance_map
from tests.flows.brand.measure import glyphs, measured_contrast

CHANNELS = load_channels()
COPY = Copy("Fresh for spring", "A new taste for the season", "Shop now")


def picture(kind: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    if kind == "light":
        return Image.new("RGB", size, (236, 228, 200))
    if kind == "dark":
        return Image.new("RGB", size, (18, 30, 60))
    rng = np.random.default_rng(7)  # busy: blocks of every colour, light and dark side by side
    blocks = rng.integers(0, 256, (h // 24 + 1, w // 24 + 1, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=2)


def _inside(mask: np.ndarray, box) -> bool:
    x, y, w, h = box
    outside = mask.copy()
    outside[y:y + h, x:x + w] = False
    return not outside.any()


@pytest.mark.parametrize("channel", sorted(CHANNELS))
@pytest.mark.parametrize("kind", ["light", "dark", "busy"])
def test_every_channel_on_every_kind_of_picture(channel, kind):
    kit = load_kit("acme")
    ch = CHANNELS[channel]
    base = picture(kind, (ch.width, ch.height))
    out, record = compose(base, kit, channel, COPY)
    assert out.size == base.size and record["layout"] == kit.layout_for(channel).name
    changed = _changed(base, out)
    assert _inside(changed, record["safe"])  # nothing drawn outside the safe zone
    # The logo: its pixels are the logo file's, drawn over the picture at the recorded box.
    x, y, w, h = record["logo"]["box"]
    logo = kit.logo(record["logo"]["variant"], w, h)
    under = np.asarray(base.crop((x, y, x + w, y + h)), dtype=np.uint16)
    if "plate" in record["logo"]:  # a plate first, at its recorded opacity, then the logo over it
        step = round(record["logo"]["plate_opacity"] * 20)
        under = (under * (20 - step) + np.array(kit.logo_plate, dtype=np.uint16) * step + 10) // 20
        assert record["logo"]["contrast"] >= kit.logo_contrast * 1.1
    expected = Image.fromarray(under.astype(np.uint8)).convert("RGBA")
    expected.alpha_composite(logo)
    got = np.asarray(out.crop((x, y, x + w, y + h)), dtype=np.int16)
    assert np.abs(got - np.asarray(expected.convert("RGB"), dtype=np.int16)).max() <= 1
    for element in ("headline", "body", "cta"):
        if element not in kit.layout_for(channel).texts:
            assert element not in record
            continue
        rec = record[element]
        box = rec.get("button") or rec["box"]
        for lx, ly, lw, lh in rec["line_boxes"]:  # every line inside its box, inside the safe zone
            assert box[0] <= lx and lx + lw <= box[0] + box[2] and box[1] <= ly and ly + lh <= box[1] + box[3]
        contrast = measured_contrast(out, kit, element, rec)
        assert contrast >= 4.5, (element, rec["choice"], contrast)
    if kind == "light":
        assert record["headline"]["choice"] == "alternate" and record["logo"]["variant"] == "dark"
    elif kind == "dark":
        assert record["headline"]["choice"] == "colour" and record["logo"]["variant"] == "light"
    if kind != "busy":  # a plain picture: one of the logos stands out by itself
        assert "plate" not in record["logo"] and record["logo"]["contrast"] >= 3


def test_a_busy_picture_gets_the_lightest_scrim_that_reads():
    kit = load_kit("acme")
    base = picture("busy", (1080, 1080))
    out, record = compose(base, kit, "instagram_square", COPY)
    head = record["headline"]
    assert head["choice"] == "scrim" and 0.35 <= head["scrim_opacity"] < 1.0 and head["contrast"] >= 4.5 * 1.1
    # One 5 % step lighter, worked out here from the clean pixels behind the glyphs, would not have read.
    coverage = glyphs(base.size, kit, "headline", head)
    width = max(2, head["size"] // 8) + 2
    around = (coverage > 127) | (cv2.dilate((coverage > 0).astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)) > 0)
    behind = np.asarray(base, dtype=np.float64)[around]
    lighter = head["scrim_opacity"] - 0.05
    mixed = np.rint(behind * (1 - lighter) + np.array([0x14, 0x14, 0x14]) * lighter).astype(np.uint8)
    worst = luminance_map(mixed).max()  # the text is white: the brightest pixel behind is the worst
    assert contrast_ratio(1.0, float(worst)) < 4.5 * 1.1


def test_the_overlay_is_deterministic_to_the_byte():
    kit = load_kit("acme")
    base = picture("busy", (1080, 1920))

    def png() -> bytes:
        buf = io.BytesIO()
        compose(base, kit, "story", COPY)[0].save(buf, "PNG")
        return buf.getvalue()

    assert png() == png()


def test_texts_move_off_the_product_and_never_touch_it():
    kit = load_kit("acme")
    ch = CHANNELS["banner"]
    product = (300, 150, 260, 400)  # a product placed where the banner's headline and body boxes are
    base = picture("busy", (ch.width, ch.height))
    out, record = compose(base, kit, "banner", COPY, product)
    x, y, w, h = product
    assert not _changed(base, out)[y:y + h, x:x + w].any()
    assert set(record["moved_for_product"]) >= {"headline"}
    for element in ("headline", "body", "cta"):
        bx, by, bw, bh = record[element]["box"]
        assert bx + bw <= x or bx >= x + w or by + bh <= y or by >= y + h


def test_a_logo_over_the_product_is_refused():
    kit = load_kit("acme")
    with pytest.raises(OverlayProblem) as info:
        fit_overlay(kit, "instagram_square", (1080, 1080), COPY, (40, 40, 300, 300))
    assert info.value.element == "logo" and "would cover the product" in str(info.value)


def test_a_headline_too_long_for_its_box_names_the_element():
    kit = load_kit("acme")
    with pytest.raises(OverlayProblem) as info:
        fit_overlay(kit, "leaderboard", (728, 90), Copy(headline="word " * 60))
    assert info.value.element == "headline" and "smallest size 10 px" in str(info.value)


def test_a_logo_lost_in_a_busy_picture_gets_a_plate_that_reads():
    kit = load_kit("acme")
    base = picture("busy", (1200, 628))
    out, record = compose(base, kit, "banner", COPY)
    logo = record["logo"]
    assert logo["plate"] == "#FFFFFF" and logo["variant"] == "dark" and 0.35 <= logo["plate_opacity"] <= 1
    # measured on the output: the logo's own colour against the worst pixel around it on the plate
    x, y, w, h = logo["box"]
    alpha = np.asarray(kit.logo("dark", w, h).getchannel("A"))
    pixels = np.asarray(out.crop((x, y, x + w, y + h)))
    ink = cv2.erode((alpha == 255).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    around = (cv2.dilate((alpha > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0) & ~(
        cv2.dilate((alpha > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)
    ink_l = float(np.median(luminance_map(pixels[ink])))
    assert contrast_ratio(ink_l, float(luminance_map(pixels[around]).max())) >= 3
    # without a plate colour in the kit the logo is drawn as it is, and its contrast recorded
    bare = load_kit("acme").__class__(**{**load_kit("acme").__dict__, "logo_plate": None})
    assert "plate" not in compose(base, bare, "banner", COPY)[1]["logo"]


def test_the_logo_takes_the_next_corner_where_the_product_takes_the_first():
    kit = load_kit("acme")  # the banner's logo: top left, else top right
    product = (120, 60, 191, 330)  # a short bottle in the left third
    base = picture("dark", (1200, 628))
    out, record = compose(base, kit, "banner", COPY, product)
    x, y, w, h = record["logo"]["box"]
    assert record["logo"]["corner"] == "top_right" and x + w > 1200 - 72 - 20 and x > product[0] + product[2]
    px, py, pw, ph = product
    assert not _changed(base, out)[py:py + ph, px:px + pw].any()
    with pytest.raises(OverlayProblem, match="in every corner the layout allows \\(top_left\\)"):
        fit_overlay(kit, "instagram_square", (1080, 1080), COPY, (40, 40, 300, 300))


def test_contrast_matches_published_wcag_figures():
    # Independent reference values (WCAG 2.x definition, as WebAIM's checker gives them).
    assert contrast_ratio((255, 255, 255), (0, 0, 0)) == pytest.approx(21.0)
    assert round(contrast_ratio((0x76, 0x76, 0x76), (255, 255, 255)), 2) == 4.54  # the lightest grey passing AA
    assert round(contrast_ratio((0x77, 0x77, 0x77), (255, 255, 255)), 2) == 4.48  # one step lighter fails
    assert round(contrast_ratio((0, 0, 255), (255, 255, 255)), 2) == 8.59

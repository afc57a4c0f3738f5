"""Fitting copy into a box: the largest size that fits, line breaks, scripts, and refusals."""

from __future__ import annotations

import pytest
from PIL import ImageFont, features

from flows.brand.text import FitError, check_copy, direction_of, fit_text
from tests.helpers import ROOT

FONT = str(ROOT / "templates" / "brands" / "acme" / "DejaVuSans-Bold.ttf")


def fit(text, box=(400, 200), sizes=(12, 120), lines=3):
    return fit_text(text, FONT, box, sizes, line_height=1.15, max_lines=lines)


def test_the_largest_size_that_fits_and_no_larger():
    f = fit("Fresh for spring")
    assert f.size > 12 and len(f.lines) <= 3 and f.width <= 400 and f.height <= 200
    with pytest.raises(FitError):  # one size up does not fit: the fit is the largest
        fit("Fresh for spring", sizes=(f.size + 1, f.size + 1))
    assert fit("Fresh for spring", sizes=(12, f.size - 3)).size == f.size - 3  # capped by the style's range


def test_lines_break_at_spaces_and_at_newlines():
    f = fit("Fresh for spring and a great deal more", box=(300, 400))
    assert " ".join(f.lines) == "Fresh for spring and a great deal more"
    f = fit("Fresh\nfor spring", box=(600, 400), sizes=(12, 40))
    assert f.lines == ("Fresh", "for spring")


def test_a_text_that_cannot_fit_says_why():
    with pytest.raises(FitError, match=r"does not fit a 100x50 px box at the smallest size 20 px \(a word is wider"):
        fit("Supercalifragilistic", box=(100, 50), sizes=(20, 40))
    with pytest.raises(FitError, match=r"lines of 20 px, at most 1 fit"):
        fit("one two three four five six", box=(120, 500), sizes=(20, 40), lines=1)
    with pytest.raises(FitError, match=r"px tall, the box is 10 px"):
        fit("tall", box=(400, 10), sizes=(20, 40))


def test_cjk_breaks_between_characters_and_keeps_its_text():
    text = "春の新作ドリンクが登場しました今すぐお試しください"
    f = fit_text(text, str(ROOT / "templates/brands/acme/DejaVuSans.ttf"), (200, 400), (12, 40), line_height=1.2,
                 max_lines=8)
    assert len(f.lines) > 1 and "".join(f.lines) == text


@pytest.mark.skipif(not features.check("raqm"), reason="Pillow without Raqm: no shaping of right-to-left text")
def test_right_to_left_text_is_shaped_and_measured_as_drawn():
    hebrew, arabic = "אביב חדש", "ربيع جديد"
    assert direction_of(hebrew) == direction_of(arabic) == "rtl" and direction_of("Spring 2025") == "ltr"
    f = fit(arabic)
    assert f.direction == "rtl"
    font = ImageFont.truetype(FONT, f.size)
    # Joined Arabic letters take their contextual forms: the shaped run is narrower than its isolated letters.
    isolated = sum(font.getlength(c, direction="rtl") for c in arabic)
    assert font.getlength(arabic, direction="rtl") < isolated
    assert f.widths[0] == round(font.getlength(f.lines[0], direction="rtl"))


def test_copy_with_hidden_controls_is_refused():
    assert check_copy("Fresh for spring") is None
    assert "U+202E" in check_copy("Fresh \u202eroF")
    assert "U+001B" in check_copy("x\x1b[2J")
    assert "at most 400" in check_copy("a" * 401)

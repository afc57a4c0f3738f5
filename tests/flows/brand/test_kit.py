"""Reading brand kits: the example kit, and each kind of mistake named by file, line and column."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from flows.brand.kit import KitError, kit_names, load_kit
from tests.flows.brand.kits import acme_text, kit_folder


def test_the_example_kit_loads_with_every_channel_layout():
    kit = load_kit("acme")
    assert kit.name == "Acme Drinks" and kit.min_contrast == 4.5 and set(kit.logos) == {"light", "dark"}
    assert set(kit.styles) == {"headline", "body", "cta"} and kit.styles["cta"].background == (0x0B, 0x6E, 0x4F)
    assert {"default", "story", "banner", "leaderboard", "skyscraper", "print_a4"} <= set(kit.layouts)
    assert kit.layout_for("instagram_square").name == "default" and kit.layout_for("story").name == "story"
    assert kit.layout_for("story").safe_box((1080, 1920)) == (60, 250, 960, 1420)  # the story's 250 px zones
    assert kit.copy["headline"].value == "{{ tagline }}"
    assert re.fullmatch(r"[0-9a-f]{64}", kit.sha256) and "acme" in kit_names()


def _error(tmp_path, text: str) -> str:
    templates = kit_folder(tmp_path, text)
    with pytest.raises(KitError) as info:
        load_kit("acme", templates)
    return str(info.value)


@pytest.mark.parametrize("old, new, message", [
    ("  ink: \"#141414\"", "  ink: \"#14141\"", "expected a colour as #RRGGBB"),
    ("colour: white, background: green", "colour: white, background: yellow", "contrast 1.68:1, under the kit's 4.5:1"),
    ("bold: acme/DejaVuSans-Bold.ttf", "bold: acme/missing.ttf", "font file 'acme/missing.ttf' not found"),
    ("bold: acme/DejaVuSans-Bold.ttf", "bold: ../../../etc/passwd", "leads out of the kit's folder"),
    ("bold: acme/DejaVuSans-Bold.ttf", "bold: acme/logo-dark.svg", "cannot be read as TrueType"),
    ("headline: {font: bold, size: [28, 96]", "headline: {font: heavy, size: [28, 96]", "unknown font 'heavy'"),
    ("headline: {font: bold, size: [28, 96]", "headline: {font: bold, size: [96, 28]", "smallest <= largest"),
    ("    headline: {box: [0, 0.1, 1, 0.2], size: [32, 96]}", "    headline: {box: [0.5, 0.1, 0.8, 0.2], size: [32, 96]}",
     "lie inside the safe zone"),
    ("    logo: {corner: top_left, width: 0.36, max_height: 0.08}", "    logo: {corner: middle, width: 0.36}",
     "expected one of top_left"),
    ("    logo: {corner: top_left, width: 0.36, max_height: 0.08}", "    logo: {corner: top_left, width: 0.36, max_height: 0.2}",
     "the logo's top_left area overlaps the headline box"),
    ("    logo: {corner: top_left, width: 0.3, max_height: 0.1}", "    logo: {corner: [top_left, top_right], width: 0.3, max_height: 0.1}",
     "the logo's top_right area overlaps the headline box"),
    ("min_contrast: 4.5", "min_contrast: 4.5\nfonts_extra: 1", "unknown key"),
])
def test_mistakes_are_named_by_file_line_and_column(tmp_path, old, new, message):
    text = acme_text()
    assert old in text
    bad = text.replace(old, new, 1)
    error = _error(tmp_path, bad)
    assert message in error
    m = re.match(r"(.+acme\.yaml):(\d+):(\d+): ", error)
    assert m, error
    first_changed = next(i for i, (a, b) in enumerate(zip(text.splitlines(), bad.splitlines()), 1) if a != b)
    assert int(m.group(2)) == first_changed  # the line of the mistake


def test_structural_problems(tmp_path):
    assert "missing layouts" in _error(tmp_path, "name: X\nlogo: {dark: acme/logo-dark.svg}\nfonts: {b: acme/DejaVuSans.ttf}\nstyles: {}\n")
    assert "appears twice" in _error(tmp_path, acme_text() + "palette: {}\n")
    assert "aliases" in _error(tmp_path, "a: &x 1\nb: *x\n")
    no_default = acme_text().replace("  default:\n", "  square:\n")
    assert "needs a 'default' layout" in _error(tmp_path, no_default)
    assert "invalid YAML" in _error(tmp_path, "name: [unclosed\n")


def test_a_logo_needs_transparency(tmp_path):
    templates = kit_folder(tmp_path)
    Image.new("RGB", (40, 20), "red").save(templates / "brands" / "acme" / "flat.png")
    text = acme_text().replace("light: acme/logo-light.svg", "light: acme/flat.png")
    (templates / "brands" / "acme.yaml").write_text(text)
    with pytest.raises(KitError, match=r"acme\.yaml:\d+:\d+: logo\.light: logo 'acme/flat.png' has no transparent pixel"):
        load_kit("acme", templates)


def test_unknown_brand_lists_the_kits(tmp_path):
    templates = kit_folder(tmp_path)
    with pytest.raises(KitError, match=r"unknown brand 'globex' \(brand kits in .*: acme\)"):
        load_kit("globex", templates)
    with pytest.raises(KitError, match="a brand name is lower-case"):
        load_kit("../acme", templates)


def test_the_kit_hash_covers_the_files_it_names(tmp_path):
    templates = kit_folder(tmp_path)
    before = load_kit("acme", templates).sha256
    logo = templates / "brands" / "acme" / "logo-dark.svg"
    logo.write_text(logo.read_text().replace("#F2C14E", "#F2C14F"))  # the YAML is unchanged
    after = load_kit("acme", templates)
    assert after.sha256 != before
    assert load_kit("acme", templates) is after  # unchanged files: the process's cached kit


def test_a_kit_as_a_folder(tmp_path):
    templates = kit_folder(tmp_path)
    brands = templates / "brands"
    (brands / "acme").joinpath("brand.yaml").write_text(acme_text().replace("acme/", ""))
    (brands / "acme.yaml").unlink()
    kit = load_kit("acme", templates)
    assert kit.path == brands / "acme" / "brand.yaml" and kit.logos["dark"] == (brands / "acme" / "logo-dark.svg").resolve()
    assert "acme" in kit_names(templates)


def test_the_logo_plate_colour_is_checked(tmp_path):
    text = acme_text().replace("  plate: white", "  plate: chalk")
    assert "unknown colour 'chalk'" in _error(tmp_path, text)


def test_an_svg_logo_is_never_drawn_at_the_size_it_claims(tmp_path):
    templates = kit_folder(tmp_path)
    logo = templates / "brands" / "acme" / "logo-dark.svg"
    # 4,200,000 x 1,200,000 px as stated: a sane aspect, so it loads, and it is drawn only at the size it is used
    logo.write_text(logo.read_text().replace('width="420" height="120"', 'width="4200000" height="1200000"'))
    kit = load_kit("acme", templates)
    assert kit.logo("dark", 300, 100).size == (300, 86) and kit.logo_size("dark") == (1000, 286)
    logo.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="1"><rect width="9" height="1"/></svg>')
    with pytest.raises(KitError, match=r"acme\.yaml:\d+:\d+: logo\.dark: logo 'acme/logo-dark.svg' cannot be read: its aspect 1e\+05 is beyond 1:50"):
        load_kit("acme", templates)

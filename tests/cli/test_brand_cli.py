"""``adforge brand list / check / preview``: kits listed with their problems, sample copy fitted on every channel,
and previews that are deterministic, the channel's exact size, and leave the product's pixels alone."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from engine.packshot import packshot_rgba, product_layer
from flows.channels import load_channels
from flows.template_config import TEMPLATES_DIR

runner = CliRunner()
PACKSHOT = Path(__file__).resolve().parents[2] / "examples" / "briefs" / "packshots" / "acme-bottle.png"
HUGE = "Refreshing " * 30  # 330 characters: within the copy limit, far beyond any headline box


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def broken_templates(tmp_path: Path) -> Path:
    """A templates folder with the acme kit and a kit whose YAML does not parse (an unclosed flow list on line 3)."""
    root = tmp_path / "templates"
    brands = root / "brands"
    brands.mkdir(parents=True)
    shutil.copy(TEMPLATES_DIR / "brands" / "acme.yaml", brands / "acme.yaml")
    shutil.copytree(TEMPLATES_DIR / "brands" / "acme", brands / "acme")
    shutil.copy(TEMPLATES_DIR / "channels.yaml", root / "channels.yaml")
    (brands / "broken.yaml").write_text("name: Broken\nmin_contrast: 4.5\nfonts: [acme/DejaVuSans.ttf\nlogo: {}\n", encoding="utf-8")
    return root


def test_list_shows_the_acme_kit() -> None:
    r = invoke("brand", "list")
    assert r.exit_code == 0, r.output
    assert "acme" in r.stdout and "Acme Drinks" in r.stdout
    assert re.search(r"\b[0-9a-f]{12}\b", r.stdout)  # the content hash, shortened
    assert "dark, light" in r.stdout


def test_list_names_a_broken_kit_with_its_place_and_exits_1(broken_templates: Path) -> None:
    r = invoke("brand", "list", "--templates-dir", str(broken_templates))
    assert r.exit_code == 1, r.output
    assert "acme" in r.stdout and "broken" in r.stdout  # the good kit still listed
    assert re.search(r"broken\.yaml:\d+:\d+: ", r.stderr), r.stderr


def test_check_passes_for_acme_on_every_channel() -> None:
    r = invoke("brand", "check", "acme")
    assert r.exit_code == 0, r.output
    for name in load_channels():
        assert name in r.stdout
    assert f"fits on {len(load_channels())} channel(s)" in r.stdout


def test_check_with_a_huge_headline_fails_naming_the_headline() -> None:
    r = invoke("brand", "check", "acme", "--headline", HUGE, "--channel", "banner", "--channel", "story")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("headline" in e for e in errors), r.stderr
    assert errors[0].startswith("error: banner (1200x628): headline ")


def test_check_a_kit_with_broken_yaml_exits_2_with_file_line_column(broken_templates: Path) -> None:
    r = invoke("brand", "check", "broken", "--templates-dir", str(broken_templates))
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert "\n" not in line
    assert re.fullmatch(r"error: .*broken\.yaml:\d+:\d+: .+", line), line
    # The templates folder's own acme kit still checks there: the option reaches channels.yaml too.
    assert invoke("brand", "check", "acme", "--templates-dir", str(broken_templates), "-c", "banner").exit_code == 0


@pytest.mark.parametrize("args, needle", [
    (("check", "nosuchbrand"), "unknown brand 'nosuchbrand'"),
    (("check", "acme", "--channel", "billboard"), "unknown channel 'billboard'"),
    (("preview", "acme", "--channel", "billboard"), "unknown channel 'billboard'"),
    (("preview", "nosuchbrand", "--channel", "banner"), "unknown brand 'nosuchbrand'"),
    (("preview", "acme", "--channel", "banner", "--placement", "upside_down"), "--placement"),
    (("preview", "acme", "--channel", "banner", "--background", "plaid"), "--background"),
])
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], needle: str, tmp_path: Path) -> None:
    r = invoke("brand", *args, *(("--out", str(tmp_path / "p.png")) if args[0] == "preview" else ()))
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert not (tmp_path / "p.png").exists()


def test_an_unreadable_product_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-png.png"
    bad.write_bytes(b"this is not an image")
    for path in (bad, tmp_path / "missing.png"):
        r = invoke("brand", "preview", "acme", "--channel", "banner", "--product", str(path), "--out", str(tmp_path / "p.png"))
        assert r.exit_code == 2, r.output
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --product") and path.name in r.stderr, r.stderr


def test_preview_text_that_cannot_fit_names_the_element_and_exits_1(tmp_path: Path) -> None:
    r = invoke("brand", "preview", "acme", "--channel", "story", "--headline", HUGE, "--out", str(tmp_path / "p.png"))
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: headline "), r.stderr
    assert not (tmp_path / "p.png").exists()


def test_preview_is_the_channels_size_and_the_same_bytes_every_time(tmp_path: Path) -> None:
    first, second, bare = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "bare.png"
    r = invoke("brand", "preview", "acme", "--channel", "story", "--out", str(first))
    assert r.exit_code == 0, r.output
    assert str(first) in r.stdout and "headline" in r.stdout and "contrast" in r.stdout
    assert invoke("brand", "preview", "acme", "--channel", "story", "--out", str(second)).exit_code == 0
    assert invoke("brand", "preview", "acme", "--channel", "story", "--no-safe-zones", "--out", str(bare)).exit_code == 0
    story = load_channels()["story"]
    with Image.open(first) as im:
        assert im.format == "PNG" and im.size == (story.width, story.height)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != bare.read_bytes()  # the guides are drawn
    with Image.open(bare) as im:
        assert im.size == (story.width, story.height)


def test_preview_backgrounds_differ_and_the_default_file_lands_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shots = {}
    for background in ("light", "dark", "busy"):
        r = invoke("brand", "preview", "acme", "--channel", "leaderboard", "--background", background)
        assert r.exit_code == 0, r.output
        default = tmp_path / "brand-preview-acme-leaderboard.png"
        assert default.is_file()
        shots[background] = default.read_bytes()
    assert len(set(shots.values())) == 3


@pytest.mark.parametrize("guides", ["--safe-zones", "--no-safe-zones"])
def test_preview_with_a_product_leaves_its_pixels_untouched(guides: str, tmp_path: Path) -> None:
    out = tmp_path / "banner.png"
    r = invoke("brand", "preview", "acme", "--channel", "banner", "--product", str(PACKSHOT), guides, "--out", str(out))
    assert r.exit_code == 0, r.output
    banner = load_channels()["banner"]
    with Image.open(PACKSHOT) as im:
        layer = product_layer(packshot_rgba(im), (banner.width, banner.height), banner.product)
    with Image.open(out) as im:
        got = np.asarray(im.convert("RGB"))
    want = np.asarray(layer.rgba.convert("RGB"))
    opaque = layer.opaque
    assert opaque.sum() > 10_000  # the bottle is really there, and large
    assert np.array_equal(got[opaque], want[opaque])
    assert f"at {list(layer.box)}" in r.stdout

"""The example campaign (examples/briefs/spring-launch.csv names the example brand kit) end to end on the bundled
model: every delivered file of every channel carries the logo where the layout puts it and the tagline inside the safe
zone at a contrast of at least 4.5:1, all read back from the files; the clean picture is stored and recorded beside
it; planning refuses what cannot be drawn, by row and column."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from flows.brand.kit import load_kit
from flows.brand.overlay_step import OverlayStep
from flows.brief import read_brief
from flows.campaign import campaign_run
from flows.channels import load_channels
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, Variant
from storage.variants import VariantSpec, parse_overlay
from tests.flows.brand.kits import acme_text, kit_folder
from tests.flows.brand.measure import measured_contrast
from tests.helpers import EXAMPLE_BRIEFS

pytestmark = pytest.mark.usefixtures("campaign_caches")
# A JPEG block with 4:2:0 chroma is 16 px; a decoder's smooth chroma upsampling reads the next block too, so pixels
# further than one block from every block the overlay touches decode the same from both files.
MCU = 16


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _blocks_of(box, size):
    x, y, w, h = box
    x0, y0 = max(0, (x // MCU - 1) * MCU), max(0, (y // MCU - 1) * MCU)
    return x0, y0, min(size[0], (-(-(x + w) // MCU) + 1) * MCU) - x0, min(size[1], (-(-(y + h) // MCU) + 1) * MCU) - y0


def test_the_example_campaign_carries_the_brand_on_every_asset(tmp_path):
    db_url, store_url = f"sqlite:///{tmp_path / 'a.db'}", str(tmp_path / "assets")
    overrides = {"steps": 2, "sampler": "Euler", "db_url": db_url, "store_url": store_url}
    summary = campaign_run(str(EXAMPLE_BRIEFS / "spring-launch.csv"), overrides=overrides)
    assert summary["status"] == "completed" and summary["counts"]["failed"] == 0, summary
    kit = load_kit("acme")
    channels = load_channels()
    db, store = open_database(db_url), open_store(store_url)
    with db.session() as s:
        rows = s.execute(select(Variant, Asset).join(Asset, Asset.variant_id == Variant.id)).all()
    db.dispose()
    assert len(rows) == summary["counts"]["rendered"] == 24
    seen_channels = set()
    for variant, asset in rows:
        pin = parse_overlay(variant.overlay)
        assert pin is not None and pin.brand == "acme" and pin.kit == kit.sha256 and pin.cta == "Shop now"
        record = json.loads(asset.overlay)
        ch = channels[variant.channel]
        seen_channels.add(variant.channel)
        data = store.get(asset.storage_key)
        delivered, clean = _decode(data), _decode(store.get(asset.clean_key))
        assert delivered.size == clean.size == (ch.width, ch.height)
        assert asset.clean_key == "clean/" + asset.storage_key
        infotext = read_image_metadata(data)[0]
        assert parse_infotext(infotext)[2]["Brand"] == f"acme [{kit.sha256[:12]}]"
        # The headline is the row's tagline, drawn in the layout's box inside the safe zone.
        tagline = {"hero-01": "Fresh for spring", "teaser-02": "Something new is growing",
                   "promo-03": "Spring deals inside", "retarget-04": "Your spring pick is waiting"}
        row_key = asset.storage_key.split("/")[1]
        assert record["headline"]["text"] == pin.headline == tagline[row_key]
        sx, sy, sw, sh = record["safe"]
        assert (sx, sy, sw, sh) == kit.layout_for(variant.channel).safe_box((ch.width, ch.height))
        for element in ("headline", "cta", "logo"):
            lines = record[element]["line_boxes"] if element != "logo" else [record["logo"]["box"]]
            for x, y, w, h in lines:
                assert sx <= x and x + w <= sx + sw and sy <= y and y + h <= sy + sh, (variant.channel, element)
        # Only the JPEG blocks the overlay's elements touch differ from the clean picture.
        touched = np.zeros((ch.height, ch.width), bool)
        for element in ("logo", "headline", "body", "cta"):
            if element in record:  # the element's box, or the logo's plate around its box
                x, y, w, h = _blocks_of(record[element].get("panel") if element == "logo" and "panel" in record[element]
                                        else record[element]["box"], delivered.size)
                touched[y:y + h, x:x + w] = True
        differs = np.any(np.asarray(delivered) != np.asarray(clean), axis=2)
        assert differs.any() and not (differs & ~touched).any(), variant.channel
        # The logo's pixels: the logo file drawn over the clean picture at its box (within JPEG's error).
        x, y, w, h = record["logo"]["box"]
        spot = kit.layout_for(variant.channel).logo
        inset = max(2, round(spot.max_height * sh) // 8)  # the room the kit's logo plate keeps around the logo
        assert spot.corners[0] == record["logo"]["corner"] == "top_left" and (x, y) == (sx + inset, sy + inset), variant.channel
        logo = kit.logo(record["logo"]["variant"], w, h)
        inside = cv2.erode((np.asarray(logo.getchannel("A")) == 255).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        colours = np.asarray(logo.convert("RGB"), dtype=np.int16)[inside]

        def logo_error(dx: int) -> float:
            got = np.asarray(delivered.crop((x + dx, y, x + dx + w, y + h)), dtype=np.int16)
            return float(np.abs(got[inside] - colours).mean())

        assert logo_error(0) < 6 and logo_error(6) > 3 * logo_error(0), variant.channel  # there, and not beside
        # Contrast of every text against what is behind it, measured on the delivered file.
        for element in ("headline", "cta"):
            assert measured_contrast(delivered, kit, element, record[element]) >= 4.5, (variant.channel, element, record[element])
    assert seen_channels == {"instagram_square", "story", "banner"}
    again = campaign_run(str(EXAMPLE_BRIEFS / "spring-launch.csv"), overrides=overrides)
    assert again["counts"]["rendered"] == 0


HEADER = "campaign,row_id,subject,channels,variants,tagline,brand,headline\n"


@pytest.mark.parametrize("row, column, message", [
    ("c,r1,a red circle,story,1,Hi,globex,", "brand", "unknown brand 'globex'"),
    ("c,r1,a red circle,leaderboard,1,Hi,acme," + "very long words " * 12, "headline", "does not fit"),
    ("c,r1,a red circle,leaderboard,1," + "very long words " * 12 + ",acme,", "tagline", "does not fit"),
])
def test_what_cannot_be_drawn_is_refused_by_row_and_column(tmp_path, row, column, message):
    brief = read_brief_text(tmp_path, HEADER + row + "\n")
    problems = plan_problems(tmp_path, brief)
    assert len(problems) == 1, problems
    assert (problems[0].line, problems[0].column) == (2, column) and message in problems[0].message


def test_copy_without_a_brand_is_a_warning_and_stays_a_template_variable(tmp_path):
    brief = read_brief_text(tmp_path, HEADER + "c,r1,a red circle,story,1,Hi,,Buy now\n")
    (row,) = brief.rows
    assert brief.problems == [] and row.extra["headline"] == "Buy now" and row.brand.brand == ""
    (warning,) = brief.warnings
    assert (warning.line, warning.column) == (2, "headline") and "draws no overlay" in warning.message


def test_a_kit_template_naming_a_missing_column_points_at_the_kit(tmp_path):
    templates = _templates_with(tmp_path, acme_text().replace("{{ tagline }}", "{{ slogan }}"))
    brief = read_brief_text(tmp_path, HEADER + "c,r1,a red circle,story,1,Hi,acme,\n")
    (problem,) = plan_problems(tmp_path, brief, templates)
    assert problem.column == "headline"
    assert "acme.yaml:" in problem.message and "uses the column 'slogan'" in problem.message


def test_rendering_refuses_a_kit_changed_since_planning(tmp_path):
    templates = _templates_with(tmp_path, acme_text())
    kit = load_kit("acme", templates)
    spec_overlay = json.dumps({"brand": "acme", "kit": "0" * 64, "layout": "story", "headline": "Hi", "body": "", "cta": ""})
    spec = VariantSpec(campaign="c", row_key="r", channel="story", template="t", variant_index=0, prompt="p",
                       negative_prompt="", seed=1, model_sha256="m", sampler="Euler", steps=1, cfg_scale=1.0,
                       clip_skip=1, gen_width=64, gen_height=64, out_width=1080, out_height=1920, out_format="png",
                       out_max_kb=None, postprocess="", overlay=spec_overlay)
    with pytest.raises(ValueError, match=r"brand kit 'acme' .* changed since the variant was planned"):
        OverlayStep(str(templates)).apply(Image.new("RGB", (1080, 1920)), spec, None)
    ok = spec_overlay.replace("0" * 64, kit.sha256)
    drawn, record = OverlayStep(str(templates)).apply(Image.new("RGB", (1080, 1920)), VariantSpec(**{**spec.as_dict(), "overlay": ok}), None)
    assert json.loads(record)["headline"]["text"] == "Hi" and drawn.size == (1080, 1920)


# ------------------------------------------------------------------------------------------------ helpers


def _templates_with(tmp_path, yaml_text: str):
    import shutil

    from flows.template_config import TEMPLATES_DIR

    templates = kit_folder(tmp_path, yaml_text)
    for name in ("channels.yaml", "styles.yaml"):
        shutil.copy(TEMPLATES_DIR / name, templates / name)
    shutil.copytree(TEMPLATES_DIR / "prompts", templates / "prompts", dirs_exist_ok=True)
    return templates


def read_brief_text(tmp_path, text: str):
    path = tmp_path / "brief.csv"
    path.write_text(text, encoding="utf-8")
    return read_brief(path, known_channels=set(load_channels()))


def plan_problems(tmp_path, brief, templates=None):
    from flows.campaign import make_plan
    from flows.settings import load_settings

    if brief.problems:
        return brief.problems
    from flows.brief_problems import BriefError

    settings = load_settings({"templates_dir": None if templates is None else str(templates)})
    try:
        return make_plan(brief, settings, None, strict=False).problems
    except BriefError as exc:  # every row refused: the last problem says so
        return [p for p in exc.problems if p.line is not None]

"""Product packshots through whole campaign runs: every delivered file holds the packshot's pixels (byte-exact in PNG,
within the encoder's error and the same across seeds in JPEG), checked here from the delivered files with Pillow, not
from the run's own record; the scene around it varies by seed; the images are pinned by sha256 in the identity, the
database and the infotext; bad image cells are file/line/column problems before anything renders; an S3 inbox brief
finds its packshot under its own prefix."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import select

from engine.packshot import Placement, packshot_rgba
from flows.brief import read_brief
from flows.brief_problems import BriefError
from flows.campaign import campaign_run, make_plan
from flows.channels import load_channels
from flows.inbox import inbox_run
from flows.settings import load_settings
from storage.assets import open_store
from storage.database import open_database
from storage.image_metadata import parse_infotext, read_image_metadata
from storage.schema import Asset, Variant
from storage.variants import parse_inputs
from tests.engine.test_packshot import draw_packshot
from tests.helpers import templates_with_channels, write_brief

HEADER = ["campaign", "row_id", "subject", "channels", "variants", "seed", "product_image", "product_mask", "placement"]
CHANNELS = ("  pack_png:\n    width: 160\n    height: 120\n    format: png\n    max_kb: 8192\n    product: centre:0.7:0.05\n"
            "  pack_jpg:\n    width: 120\n    height: 160\n    format: jpeg\n    max_kb: 8192\n    product: bottom:0.6:0.05\n")


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    return templates_with_channels(tmp_path, CHANNELS)


def _shots(folder: Path) -> dict[str, Path]:
    """A transparent packshot, and a product photo without transparency plus its mask."""
    folder.mkdir(parents=True, exist_ok=True)
    draw_packshot().save(folder / "bottle.png")
    photo = Image.new("RGB", (160, 160), (235, 235, 230))
    ImageDraw.Draw(photo).ellipse((40, 30, 120, 140), fill=(200, 40, 40))
    ImageDraw.Draw(photo).rectangle((70, 60, 90, 110), fill=(250, 220, 0))
    photo.save(folder / "photo.jpg", quality=95)
    mask = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(mask).ellipse((40, 30, 120, 140), fill=255)
    mask.save(folder / "photo-mask.png")
    return {"bottle": folder / "bottle.png", "photo": folder / "photo.jpg", "mask": folder / "photo-mask.png"}


def _rows() -> list[dict]:
    return [
        {"campaign": "pk", "row_id": "bottle", "subject": "a red circle", "channels": "pack_png, pack_jpg", "variants": "2",
         "seed": "11", "product_image": "shots/bottle.png"},
        {"campaign": "pk", "row_id": "photo", "subject": "a blue square", "channels": "pack_png", "variants": "2",
         "seed": "40", "product_image": "shots/photo.jpg", "product_mask": "shots/photo-mask.png",
         "placement": "left_third:0.9"},
    ]


def _overrides(model: Path, templates: Path, db_url: str, store_url: str) -> dict:
    return {"model": str(model), "templates_dir": str(templates), "steps": 4, "sampler": "Euler", "db_url": db_url,
            "store_url": store_url}


def _expected(product: Image.Image, canvas: tuple[int, int], placement: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(RGB, opaque mask) of the product on the canvas, resized by Pillow here, and its box."""
    left, top, bw, bh = Placement.parse(placement).box(canvas, product.size)
    resized = np.asarray(product.resize((bw, bh), Image.Resampling.LANCZOS))
    rgb = np.zeros((canvas[1], canvas[0], 3), np.uint8)
    opaque = np.zeros((canvas[1], canvas[0]), bool)
    rgb[top:top + bh, left:left + bw] = resized[..., :3]
    opaque[top:top + bh, left:left + bw] = resized[..., 3] == 255
    return rgb, opaque, (left, top, bw, bh)


def _check_run(db_url: str, store_url: str, shots: dict[str, Path], channels) -> None:
    db = open_database(db_url)
    store = open_store(store_url)
    with db.session() as s:
        rows = s.execute(select(Variant, Asset).join(Asset, Asset.variant_id == Variant.id).order_by(Variant.id)).all()
    db.dispose()
    assert len(rows) == 6
    products = {"bottle": packshot_rgba(Image.open(shots["bottle"])),
                "photo": packshot_rgba(Image.open(shots["photo"]), Image.open(shots["mask"]))}
    seen: dict[tuple[str, str], list[np.ndarray]] = {}
    for variant, asset in rows:
        inputs = parse_inputs(variant.inputs)
        assert inputs.product is not None
        row = "photo" if inputs.product.mask else "bottle"
        data = store.get(asset.storage_key)
        delivered = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        canvas = (channels[variant.channel].width, channels[variant.channel].height)
        want, opaque, box = _expected(products[row], canvas, inputs.product.placement)
        assert opaque.sum() > 200
        _, _, params = parse_infotext(read_image_metadata(data)[0])
        if asset.format == "png":
            assert np.array_equal(delivered[opaque], want[opaque]), (row, variant.channel)
        else:
            # Within the encoder's error: the product alone on grey, saved by Pillow at the quality the file names.
            alone = np.where(opaque[..., None], want, 127).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(alone).save(buf, "JPEG", quality=int(params["Output quality"]))
            encoder = np.abs(np.asarray(Image.open(buf).convert("RGB"))[opaque].astype(int) - want[opaque]).mean()
            error = np.abs(delivered[opaque].astype(int) - want[opaque]).mean()
            assert error < encoder + 3, (row, variant.channel, error, encoder)
        assert asset.product_changed is False and asset.product_error is not None
        assert params["Product"].startswith(f"shots/{shots[row].name} [{inputs.product.image[:12]}]")
        assert params["Placement"] == inputs.product.placement and params["Denoising strength"] == "1"
        seen.setdefault((row, variant.channel), []).append((delivered, opaque))
    for key, ((a, opaque), (b, _)) in seen.items():  # two seeds each: the product stays, the scene around it does not
        assert np.abs(a[opaque].astype(int) - b[opaque]).mean() < 3, key
        assert np.abs(a[~opaque].astype(int) - b[~opaque]).mean() > 5, key
    assert {k for k in store.list("inputs/")} == {f"inputs/{parse_inputs(v.inputs).product.image}{p.suffix}"
                                                 for v, _ in rows for p in [shots["photo" if parse_inputs(v.inputs).product.mask else "bottle"]]} | {
        f"inputs/{parse_inputs(rows[-1][0].inputs).product.mask}.png"}


@pytest.mark.parametrize("backend", ["sqlite-local", "postgresql-s3"])
def test_packshots_stay_pixel_exact_in_every_asset(backend: str, tmp_path: Path, templates: Path, campaign_model: Path,
                                                  campaign_caches, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite-local":
        db_url, store_url = f"sqlite:///{tmp_path / 'a.db'}", str(tmp_path / "assets")
    else:
        db_url = request.getfixturevalue("postgres_url")
        store_url = f"s3://{request.getfixturevalue('s3_bucket')}/assets?endpoint_url={request.getfixturevalue('s3_endpoint')}"
    shots = _shots(tmp_path / "shots")
    brief = write_brief(tmp_path / "brief.csv", _rows(), HEADER)
    overrides = _overrides(campaign_model, templates, db_url, store_url)
    summary = campaign_run(str(brief), overrides=overrides)
    assert summary["status"] == "completed" and summary["counts"]["rendered"] == 6, summary
    _check_run(db_url, store_url, shots, load_channels(templates / "channels.yaml"))
    again = campaign_run(str(brief), overrides=overrides)
    assert again["counts"]["rendered"] == 0 and again["counts"]["skipped"] == 6


def test_the_packshot_is_part_of_the_identity(tmp_path: Path, templates: Path, campaign_model: Path) -> None:
    settings = load_settings(_overrides(campaign_model, templates, f"sqlite:///{tmp_path / 'a.db'}", str(tmp_path / "s")), env={})
    channels = load_channels(templates / "channels.yaml")
    shots = _shots(tmp_path / "shots")

    def identities(rows: list[dict]) -> list[str]:
        brief = read_brief(write_brief(tmp_path / "brief.csv", rows, HEADER), known_channels=set(channels))
        plan = make_plan(brief, settings, None, strict=True)
        return [v.identity for v in plan.variants]

    base = identities(_rows()[:1])
    assert identities(_rows()[:1]) == base
    assert set(identities([_rows()[0] | {"placement": "right_third"}])).isdisjoint(base)
    Image.open(shots["bottle"]).rotate(180).save(shots["bottle"])  # new bytes, same name: new assets
    assert set(identities(_rows()[:1])).isdisjoint(base)
    plain = identities([_rows()[0] | {"product_image": ""}])
    assert set(plain).isdisjoint(base)


def test_bad_image_cells_are_row_problems_before_rendering(tmp_path: Path, templates: Path, campaign_model: Path) -> None:
    settings = load_settings(_overrides(campaign_model, templates, f"sqlite:///{tmp_path / 'a.db'}", str(tmp_path / "s")), env={})
    channels = load_channels(templates / "channels.yaml")
    _shots(tmp_path / "shots")
    Image.new("RGBA", (32, 32)).save(tmp_path / "shots" / "tiny.png")
    (tmp_path / "shots" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("L", (160, 160), 0).save(tmp_path / "shots" / "empty-mask.png")
    (tmp_path.parent / "secret.png").write_bytes(b"x")
    good = _rows()[0]
    cases = {
        "missing": ({"product_image": "shots/nope.png"}, "product_image", "'shots/nope.png' not found"),
        "outside": ({"product_image": "../secret.png"}, "product_image", "outside the brief's folder"),
        "tiny": ({"product_image": "shots/tiny.png"}, "product_image", "needs at least 64 pixels a side"),
        "broken": ({"product_image": "shots/broken.png"}, "product_image", "not a readable image"),
        "gif": ({"product_image": "shots/bottle.gif"}, "product_image", "unsupported image type"),
        "nomask": ({"product_image": "shots/photo.jpg", "product_mask": "shots/empty-mask.png"}, "product_mask",
                   "the mask covers nothing"),
        "opaque": ({"product_image": "shots/photo.jpg"}, "product_image", "no transparent pixel"),
    }
    rows = [good | {"row_id": name, **cells} for name, (cells, _, _) in cases.items()]
    brief = read_brief(write_brief(tmp_path / "brief.csv", rows, HEADER), known_channels=set(channels))
    with pytest.raises(BriefError) as caught:
        make_plan(brief, settings, None, strict=True)
    problems = caught.value.problems
    for line, (name, (_, column, message)) in enumerate(cases.items(), start=2):
        found = [p for p in problems if p.line == line]
        assert len(found) == 1 and found[0].column == column and message in found[0].message, (name, found)
        assert str(tmp_path / "brief.csv") in str(found[0])
    # Brief-level: a mask or placement without a product image, a bad placement.
    brief = read_brief(write_brief(tmp_path / "b2.csv", [
        good | {"row_id": "m", "product_image": "", "product_mask": "shots/photo-mask.png"},
        good | {"row_id": "p", "placement": "top"},
    ], HEADER), known_channels=set(channels))
    assert [(p.line, p.column) for p in brief.problems] == [(2, "product_mask"), (3, "placement")]
    assert "unknown placement 'top'" in brief.problems[1].message


def test_an_s3_inbox_brief_finds_its_packshot_under_its_prefix(tmp_path: Path, templates: Path, campaign_model: Path,
                                                              campaign_caches, s3_endpoint: str, s3_bucket: str) -> None:
    shots = _shots(tmp_path / "shots")
    brief = write_brief(tmp_path / "brief.csv", _rows()[:1], HEADER)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="inbox/launch.csv", Body=brief.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="inbox/shots/bottle.png", Body=shots["bottle"].read_bytes())
    store_url = str(tmp_path / "assets")
    overrides = _overrides(campaign_model, templates, f"sqlite:///{tmp_path / 'a.db'}", store_url)
    result = inbox_run(f"s3://{s3_bucket}/inbox?endpoint_url={s3_endpoint}", overrides=overrides)
    (entry,) = result["briefs"]
    assert entry["status"] == "rendered" and entry["counts"]["rendered"] == 4, entry
    db = open_database(overrides["db_url"])
    with db.session() as s:
        assets = s.scalars(select(Asset)).all()
    db.dispose()
    assert len(assets) == 4 and all(a.product_changed is False for a in assets)
    pngs = [a for a in assets if a.format == "png"]
    product = packshot_rgba(Image.open(shots["bottle"]))
    want, opaque, _ = _expected(product, (160, 120), "centre:0.7:0.05:0.35")
    for a in pngs:
        delivered = np.asarray(Image.open(io.BytesIO(open_store(store_url).get(a.storage_key))).convert("RGB"))
        assert np.array_equal(delivered[opaque], want[opaque])


def test_input_reads_stop_at_the_cap_on_every_store(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> None:
    """An oversized image is refused having read at most the cap plus one byte, from a folder or from S3, and a
    path may not climb out of the brief's folder or prefix."""
    from flows.input_images import FolderSource, InputError, StoreSource

    big = bytes(range(256)) * 20  # 5,120 bytes
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(big)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="inbox/big.png", Body=big)
    s3 = open_store(f"s3://{s3_bucket}/inbox?endpoint_url={s3_endpoint}")
    local = open_store(str(tmp_path / "in"))
    for store in (s3, local):
        assert store.get("big.png", max_bytes=1000) == big[:1001]
        assert store.get("big.png") == big
        with pytest.raises(InputError, match="more than"):
            StoreSource(store, "").read("big.png", max_bytes=1000)
        with pytest.raises(InputError, match="outside the brief's prefix"):
            StoreSource(store, "").read("../secret.png", max_bytes=1000)
    with pytest.raises(InputError, match="MiB"):
        FolderSource(tmp_path / "in").read("big.png", max_bytes=1000)

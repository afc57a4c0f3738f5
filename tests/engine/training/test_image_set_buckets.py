"""The training folder reader (every problem named before training) and the aspect buckets (the product stays whole)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from engine.training import image_set as image_set_module
from engine.training.buckets import (
    assign_buckets, bucket_step, crop_loss, fit_to_bucket, make_buckets, nearest_bucket,
)
from engine.training.image_set import ImageSetError, load_image_set, load_regularisation_set, with_regularisation


def _img(path: Path, w: int, h: int, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (w, h), colour).save(path)
    return path


def _load(folder: Path, min_side: int = 128):
    return load_image_set(folder, trigger="zwx", class_word="bottle", min_side=min_side)


def test_reads_images_and_captions(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", 200, 150)
    _img(tmp_path / "b.jpg", 150, 300)
    (tmp_path / "a.txt").write_text("ZWX bottle, on a\nwooden table", encoding="utf-8")
    s = _load(tmp_path)
    assert [(i.path.name, i.caption, i.width, i.height) for i in s.items] == [
        ("a.png", "ZWX bottle, on a wooden table", 200, 150), ("b.jpg", "zwx bottle", 150, 300)]
    assert s.tag_frequency() == {tmp_path.name: {"ZWX bottle": 1, "on a wooden table": 1, "zwx bottle": 1}}
    before = s.sha256
    (tmp_path / "a.txt").write_text("zwx bottle on grass")
    assert _load(tmp_path).sha256 != before  # captions are part of the identity


def test_regularisation_images_are_captioned_with_the_class_word_and_never_the_trigger(tmp_path: Path) -> None:
    product, reg = tmp_path / "product", tmp_path / "reg"
    product.mkdir(), reg.mkdir()
    _img(product / "a.png", 128, 128)
    _img(reg / "r1.png", 160, 128)
    _img(reg / "r2.png", 128, 128)
    (reg / "r2.txt").write_text("a bottle on a shelf")
    images = load_image_set(product, trigger="zwx", class_word="bottle", min_side=128)
    regs = load_regularisation_set(reg, trigger="zwx", class_word="bottle", min_side=128)
    assert [i.caption for i in regs.items] == ["bottle", "a bottle on a shelf"]
    merged = with_regularisation(images, regs)
    assert [i.caption for i in merged.items] == ["zwx bottle", "bottle", "a bottle on a shelf"]
    assert (merged.regularisation, merged.regularisation_folder) == (2, reg) and merged.sha256 != images.sha256
    (reg / "r2.txt").write_text("a ZWX bottle")
    _img(reg / "small.png", 64, 64)
    with pytest.raises(ImageSetError) as err:
        load_regularisation_set(reg, trigger="zwx", class_word="bottle", min_side=128)
    assert any("r2.txt: a regularisation caption must not say the trigger" in p for p in err.value.problems)
    assert any("small.png" in p and "too small" in p for p in err.value.problems)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (300, 150))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a portrait phone photo stored landscape
    im.save(tmp_path / "p.jpg", exif=exif)
    assert _load(tmp_path).items[0][2:] == (150, 300)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("zwx")
    with pytest.raises(ImageSetError, match="no images") as err:
        _load(tmp_path)
    assert len(err.value.problems) == 1


def test_every_problem_is_listed_with_its_file(tmp_path: Path) -> None:
    _img(tmp_path / "good.png", 256, 256)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _img(tmp_path / "small.png", 300, 100)
    _img(tmp_path / "other.png", 256, 256)
    (tmp_path / "other.txt").write_text("a bottle on a table")
    _img(tmp_path / "latin.png", 256, 256)
    (tmp_path / "latin.txt").write_bytes(b"zwx bottle \xff\xfe caf\xe9")
    with pytest.raises(ImageSetError) as err:
        _load(tmp_path)
    problems = err.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "broken.png: not a readable image" in text
    assert "small.png: 300x100 is too small" in text and "128" in text
    assert "other.txt: caption does not mention the trigger word 'zwx'" in text
    assert "latin.txt: caption is not UTF-8" in text
    assert all(p.split(":")[0] in {"broken.png", "small.png", "other.txt", "latin.txt"} for p in problems)
    assert "4 problems" in str(err.value)


def test_trigger_must_be_a_whole_word(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", 256, 256)
    (tmp_path / "a.txt").write_text("zwxy bottle")
    with pytest.raises(ImageSetError, match="does not mention"):
        _load(tmp_path)


def test_oversized_images_are_refused_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _img(tmp_path / "huge.png", 400, 400)
    monkeypatch.setattr(image_set_module, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ImageSetError, match="huge.png: 400x400 is 0 megapixels, over the 0 megapixel limit"):
        _load(tmp_path)
    monkeypatch.setattr(image_set_module, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ImageSetError, match="huge.png: file is .* MB, over the"):
        _load(tmp_path)


@pytest.mark.parametrize(("resolution", "align"), [(128, 16), (512, 64), (768, 64)])
def test_buckets_respect_area_step_and_ratio(resolution: int, align: int) -> None:
    step = bucket_step(resolution, align)
    buckets = make_buckets(resolution, step)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= resolution**2 and max(w / h, h / w) <= 2.0
    assert bucket_step(128, 16) == 16 and bucket_step(512, 64) == 64


def test_extreme_landscape_keeps_the_product() -> None:
    buckets = make_buckets(512, 64)
    wide = nearest_bucket(3000, 1000, buckets)  # 3:1 panorama: beyond the ratio limit
    assert wide[0] > wide[1] and wide[0] / wide[1] == 2.0
    assert crop_loss(3000, 1000, wide) < 0.34  # a centre square would cut 67 %
    assert crop_loss(1600, 800, nearest_bucket(1600, 800, buckets)) == 0.0  # 2:1 fits exactly
    tall = nearest_bucket(1000, 1500, buckets)
    assert tall[1] > tall[0] and crop_loss(1000, 1500, tall) < 0.11  # 2:3 sits between 384x640 and 448x576
    assert nearest_bucket(999, 1000, buckets) == (512, 512)


def test_fit_to_bucket_crops_only_the_remainder() -> None:
    im = Image.new("RGB", (600, 400), (255, 255, 255))
    for x in range(0, 12):  # the product touches the left edge
        for y in range(180, 220):
            im.putpixel((x, y), (255, 0, 0))
    bucket = nearest_bucket(600, 400, make_buckets(128, 16))
    out = fit_to_bucket(im, bucket)
    assert out.size == bucket
    assert any(out.getpixel((x, bucket[1] // 2))[1] < 128 for x in range(0, 3))  # still there after the crop
    assignment = assign_buckets([(600, 400), (400, 600), (500, 500)], make_buckets(128, 16))
    assert sorted(i for m in assignment.values() for i in m) == [0, 1, 2]

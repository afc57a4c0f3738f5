from __future__ import annotations

from pathlib import Path

from PIL import Image

from storage.image_metadata import (
    TRAINED_ALGORITHMIC_MEDIA,
    encode_png,
    format_infotext,
    parse_infotext,
    read_png_metadata,
    write_atomic,
)

PARAMS = {
    "Steps": "25",
    "Sampler": "DPM++ 2M Karras",
    "CFG scale": "7",
    "Seed": "42",
    "Size": "512x512",
    "Model hash": "abcdef1234",
    "Model": "name",
}


def test_infotext_layout_matches_a1111() -> None:
    text = format_infotext("a lighthouse, (clouds:1.3)", "blurry", PARAMS)
    assert text == (
        "a lighthouse, (clouds:1.3)\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: abcdef1234, Model: name"
    )
    assert "Negative prompt" not in format_infotext("x", "", PARAMS)


def test_awkward_values_are_json_quoted_and_round_trip() -> None:
    params = {**PARAMS, "Model": 'my, "odd": model\nname'}
    prompt, negative = "line one\nline two", "bad: hands, extra\nfingers"
    text = format_infotext(prompt, negative, params)
    assert 'Model: "my, \\"odd\\": model\\nname"' in text
    assert parse_infotext(text) == (prompt, negative, params)


def test_png_carries_infotext_and_ai_mark(tmp_path: Path) -> None:
    text = format_infotext("ünïcode prompt ✓", "", PARAMS)
    path = tmp_path / "sub" / "a.png"
    write_atomic(path, encode_png(Image.new("RGB", (8, 8), "red"), text))
    info, xmp = read_png_metadata(path)
    assert info == text
    assert xmp is not None and TRAINED_ALGORITHMIC_MEDIA in xmp
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temp file left behind

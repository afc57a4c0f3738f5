"""Channel formats, style presets, prompt templates and ``{a|b}`` variations (flows/templating.py). CPU-light."""

from __future__ import annotations

import dataclasses
import math

import pytest

from flows.brief import read_brief
from flows.channels import CHANNEL_FORMATS, load_channels, native_size_for
from flows.styles import load_styles
from flows.template_config import TEMPLATES_DIR, TemplatingConfigError
from flows.templating import TemplateError, render_prompts
from flows.variations import expand_variations

from tests.helpers import EXAMPLE_BRIEFS, write_text

BRIEF = EXAMPLE_BRIEFS / "spring-launch.csv"
REQUIRED_CHANNELS = {
    "instagram_square": (1080, 1080),
    "instagram_portrait": (1080, 1350),
    "story": (1080, 1920),
    "banner": (1200, 628),
    "leaderboard": (728, 90),
}


@pytest.fixture(scope="module")
def brief_rows():
    return read_brief(BRIEF, known_channels=load_channels(), strict=True).rows


# --------------------------------------------------------------------------- channels / styles


def test_channels_load_and_are_valid(channels):
    for name, size in REQUIRED_CHANNELS.items():
        assert (channels[name].width, channels[name].height) == size
    assert any(name.startswith("print") for name in channels)
    for name, ch in channels.items():
        assert ch.name == name
        assert ch.format in CHANNEL_FORMATS
        assert ch.max_kb > 0 and ch.description
        assert (TEMPLATES_DIR / "prompts" / f"{ch.template}.j2").is_file()
    assert channels["story"].aspect == pytest.approx(9 / 16)
    assert channels["banner"].orientation == "landscape"
    assert channels["instagram_square"].orientation == "square"


def test_styles_load(styles):
    assert {"clean", "bold", "pastel"} <= set(styles)
    for name, preset in styles.items():
        assert preset.name == name and (preset.positive or preset.negative)


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("width: 0\n    height: 10\n    format: png\n    max_kb: 5", "channels.bad.width"),
        ("width: 10\n    height: wide\n    format: png\n    max_kb: 5", "channels.bad.height"),
        ("width: 10\n    height: 10\n    format: gif\n    max_kb: 5", "channels.bad.format"),
        ("width: 10\n    height: 10\n    format: png", "channels.bad.max_kb"),
        ("width: 10\n    height: 10\n    format: png\n    max_kb: 5\n    colour: red", "channels.bad.colour"),
    ],
)
def test_bad_channel_entry_names_file_and_key(tmp_path, entry, key):
    ok = "  ok:\n    width: 1\n    height: 1\n    format: png\n    max_kb: 1\n"
    path = write_text(tmp_path / "cfg.yaml", f"channels:\n{ok}  bad:\n    {entry}\n")
    with pytest.raises(TemplatingConfigError) as info:
        load_channels(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_bad_channel_name_and_broken_yaml(tmp_path):
    path = write_text(tmp_path / "cfg.yaml", "channels:\n  Big Banner:\n    width: 1\n    height: 1\n    format: png\n    max_kb: 1\n")
    with pytest.raises(TemplatingConfigError, match=r"channels\.Big Banner.*big_banner"):
        load_channels(path)
    path = write_text(tmp_path / "cfg.yaml", "channels:\n  a: [1, 2\n")
    with pytest.raises(TemplatingConfigError, match=r"cfg\.yaml:\d+: invalid YAML"):
        load_channels(path)
    path = write_text(tmp_path / "cfg.yaml", "formats: {}\n")
    with pytest.raises(TemplatingConfigError, match=r"cfg\.yaml: key 'channels'"):
        load_channels(path)


def test_bad_style_entry_names_file_and_key(tmp_path):
    path = write_text(tmp_path / "cfg.yaml", "styles:\n  clean:\n    positive: tidy\n    negtive: mess\n")
    with pytest.raises(TemplatingConfigError) as info:
        load_styles(path)
    assert str(path) in str(info.value) and "styles.clean.negtive" in str(info.value)


# --------------------------------------------------------------------------- variations


def test_combinatorial_all_in_stable_order():
    assert expand_variations("{red|blue} {cube|ball}") == ["red cube", "red ball", "blue cube", "blue ball"]
    assert expand_variations("no groups | here") == ["no groups | here"]
    assert expand_variations("{x} and {a|a}") == ["x and a"]  # single option; duplicates dropped
    assert expand_variations("a{|b}") == ["a", "ab"]
    assert expand_variations("{red|blue} {cube|ball}", count=3) == ["red cube", "red ball", "blue cube"]


def test_random_is_reproducible_and_draws_from_the_options():
    a = expand_variations("{red|blue|green} {cube|ball}", mode="random", seed=7, count=20)
    b = expand_variations("{red|blue|green} {cube|ball}", mode="random", seed=7, count=20)
    assert a == b and len(a) == 20
    everything = set(expand_variations("{red|blue|green} {cube|ball}"))
    assert set(a) <= everything and len(set(a)) > 1
    assert expand_variations("{a|b}", mode="random", seed=1) in (["a"], ["b"])
    seeds = {tuple(expand_variations("{a|b|c|d}", mode="random", seed=s, count=8)) for s in range(5)}
    assert len(seeds) > 1


def test_nested_groups():
    assert expand_variations("{a {b|c}|d}!") == ["a b!", "a c!", "d!"]
    assert expand_variations("{x|{y|z}}") == ["x", "y", "z"]  # '}}' is fine
    picks = expand_variations("{a {b|c}|d}", mode="random", seed=0, count=30)
    assert set(picks) <= {"a b", "a c", "d"}


def test_escaped_braces_and_other_backslashes():
    assert expand_variations(r"\{literal\} {a|b} \| \(weight\)") == [
        r"{literal} a | \(weight\)",
        r"{literal} b | \(weight\)",
    ]
    assert expand_variations(r"{a\|b|c}") == ["a|b", "c"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("ab{c", "'{' at position 2"), ("a}b", "'}' at position 1"), ("{a|{b}", "'{' at position 0")],
)
def test_unbalanced_brace_names_position(text, message):
    with pytest.raises(ValueError, match=message):
        expand_variations(text)


def test_bad_mode_and_count():
    with pytest.raises(ValueError, match="mode"):
        expand_variations("a", mode="shuffle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        expand_variations("a", count=0)


# --------------------------------------------------------------------------- prompts


def test_prompts_for_every_example_row_and_channel(brief_rows, channels, styles):
    assert len(brief_rows) == 4
    for row in brief_rows:
        for name in channels:  # every channel, not only those the row asks for
            variants = render_prompts(row, name, channels=channels, styles=styles)
            assert variants, (row.row_id, name)
            assert [v.variation_index for v in variants] == list(range(len(variants)))
            assert len({v.prompt for v in variants}) == len(variants)
            for v in variants:
                assert v.template_name == channels[name].template
                assert v.prompt.startswith(row.subject)
                assert row.message in v.prompt and row.audience in v.prompt and row.style in v.prompt
                assert "{" not in v.prompt and "}" not in v.prompt and "  " not in v.prompt
                assert ", ," not in v.prompt and not v.prompt.endswith(",")
                assert v.negative_prompt == row.negative_prompt


def test_banner_template_variations(brief_rows, channels, styles):
    hero = brief_rows[0]
    prompts = [v.prompt for v in render_prompts(hero, "banner", channels=channels, styles=styles)]
    assert len(prompts) == 2
    assert "subject on the left side" in prompts[0] and "subject on the right side" in prompts[1]
    random_mode = render_prompts(hero, "banner", channels=channels, styles=styles, mode="random")
    assert len(random_mode) == hero.variants
    assert random_mode == render_prompts(hero, "banner", channels=channels, styles=styles, mode="random")


def test_style_preset_and_negatives(brief_rows, channels, styles):
    row = dataclasses.replace(brief_rows[1], style="Bold")  # teaser-02 has negative "blurry, text, watermark"
    (first, *_) = render_prompts(row, "story", channels=channels, styles=styles)
    assert styles["bold"].positive in first.prompt and "Bold" not in first.prompt
    assert first.negative_prompt == f"blurry, text, watermark, {styles['bold'].negative}"
    # Verbatim style text, no preset: nothing added to the negative prompt.
    plain = render_prompts(brief_rows[1], "story", channels=channels, styles=styles)[0]
    assert "clean minimal poster" in plain.prompt and plain.negative_prompt == "blurry, text, watermark"
    # No presets at all: "bold" stays the literal word.
    literal = render_prompts(dataclasses.replace(row, style="bold"), "story", channels=channels, styles={})[0]
    assert ", bold," in literal.prompt


def test_extra_columns_and_variations_from_brief_values(tmp_path, brief_rows, channels):
    (tmp_path / "tag.j2").write_text(
        "{{ subject }} {{ tagline }} {{ extra['tagline'] }} for {{ channel }} {{ width }}x{{ height }}"
    )
    hero = brief_rows[0]
    row = dataclasses.replace(hero, subject="a {red|blue} circle")
    out = render_prompts(row, "story", "tag", styles={}, channels=channels, templates_dir=tmp_path)
    assert [v.prompt for v in out] == [
        "a red circle Fresh for spring Fresh for spring for story 1080x1920",
        "a blue circle Fresh for spring Fresh for spring for story 1080x1920",
    ]
    assert all(v.template_name == "tag" for v in out)


def test_strict_undefined_names_template_and_variable(tmp_path, brief_rows, channels):
    (tmp_path / "moody.j2").write_text("{{ subject }},\n{{ mood }}\n")
    with pytest.raises(TemplateError) as info:
        render_prompts(brief_rows[0], "story", "moody", styles={}, channels=channels, templates_dir=tmp_path)
    text = str(info.value)
    assert "template 'moody'" in text and "moody.j2:2" in text and "variable 'mood' is undefined" in text
    assert "hero-01" in text


def test_template_and_channel_errors(tmp_path, brief_rows, channels):
    with pytest.raises(TemplateError, match="template 'nope'"):
        render_prompts(brief_rows[0], "story", "nope", styles={}, channels=channels)
    (tmp_path / "open.j2").write_text("{{ subject }} {unclosed")
    with pytest.raises(TemplateError, match=r"template 'open'.*'\{' at position"):
        render_prompts(brief_rows[0], "story", "open", styles={}, channels=channels, templates_dir=tmp_path)
    with pytest.raises(KeyError, match="unknown channel 'tv_spot'"):
        render_prompts(brief_rows[0], "tv_spot", styles={}, channels=channels)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("native", [512, 768, 1024])
def test_native_size_for_every_channel(channels, native):
    for ch in channels.values():
        w, h = native_size_for(ch, native)
        assert w % 8 == 0 and h % 8 == 0, (ch.name, w, h)
        assert abs((w / h) / ch.aspect - 1) < 0.03, (ch.name, w, h)
        assert abs(w * h / native**2 - 1) < 0.10, (ch.name, w, h)
        assert (w > h) == (ch.width > ch.height) and (w == h) == (ch.width == ch.height)


def test_native_size_examples(channels):
    assert native_size_for(channels["instagram_square"], 512) == (512, 512)
    assert native_size_for(channels["story"], 512) == (384, 680)
    assert native_size_for(channels["banner"], 1024, multiple=64) == (1344, 704)  # aspect first, area -10%
    w, h = native_size_for(channels["leaderboard"], 512)
    assert math.isclose(w / h, 728 / 90, rel_tol=0.03)

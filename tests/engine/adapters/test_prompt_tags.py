"""A1111 ``<lora:...>`` tags: what each spelling means, and what is refused."""

from __future__ import annotations

import pytest

from engine.adapters.prompt_tags import LoraTag, combine_lora_tags, parse_lora_tags, strip_lora_tags
from engine.adapters.refs import AdapterError


@pytest.mark.parametrize(
    ("tag", "want"),
    [
        ("<lora:style>", LoraTag("style", 1.0, 1.0)),
        ("<lora:style:0.8>", LoraTag("style", 0.8, 0.8)),  # one number sets both
        ("<lora:style:0.8:0.3>", LoraTag("style", 0.8, 0.3)),
        ("<lora:style:-0.5>", LoraTag("style", -0.5, -0.5)),  # negative strengths are a real use (inverting a LoRA)
        ("<lora:style:+1.25:-.5>", LoraTag("style", 1.25, -0.5)),
        ("<lora:style:1e-1>", LoraTag("style", 0.1, 0.1)),
        ("<lora:style:te=0.5>", LoraTag("style", 0.5, 0.5)),  # unet defaults to te after the override
        ("<lora:style:unet=0.3>", LoraTag("style", 1.0, 0.3)),
        ("<lora:style:0.7:unet=0.2>", LoraTag("style", 0.7, 0.2)),
        ("<lora:style:0.7:0.6:te=0.1>", LoraTag("style", 0.1, 0.6)),  # named beats positional
        ("<lora:style:te=0.4:0.9>", LoraTag("style", 0.4, 0.4)),  # 0.9 is positional 2 = te, overridden by te=
        ("<lora:my style v1.5:0.6>", LoraTag("my style v1.5", 0.6, 0.6)),  # spaces and dots in names
        ("<lora: my style :0.6 >", LoraTag("my style", 0.6, 0.6)),
        ("<lyco:locon-thing:0.5>", LoraTag("locon-thing", 0.5, 0.5)),  # LyCORIS alias
    ],
)
def test_a1111_tag_syntax(tag: str, want: LoraTag) -> None:
    text, tags = parse_lora_tags(f"a cat {tag}, sitting")
    assert tags == [want]
    assert text == "a cat , sitting"  # only the tag is cut out, as A1111 does


def test_several_loras_in_order_and_repeats_merge() -> None:
    text, tags = parse_lora_tags("<lora:b:0.5>x<lora:a>y<lyco:c:1:0>z<lora:b:0.5>")
    assert text == "xyz"
    assert tags == [LoraTag("b", 0.5, 0.5), LoraTag("a"), LoraTag("c", 1.0, 0.0)]
    assert strip_lora_tags("no tags (here:1.2)") == "no tags (here:1.2)"
    assert parse_lora_tags("") == ("", [])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<lora:x:abc>", r"<lora:x:abc>.*'abc' is not a number"),
        ("<lora:x:1:abc>", r"U-Net strength 'abc'"),
        ("<lora:x:te=>", r"text-encoder strength ''"),
        ("<lora:x:1e999>", "out of range"),
        ("<lora:x:nan>", "not a number"),
        ("<lora::1>", "name is missing"),
        ("<lora:x:1:1:8>", "dyn"),
        ("<lora:x:dyn=8>", "dyn"),
        ("<lora:x:1:1:1:1>", "too many fields"),
        ("<lora:x:unte=0.5>", "unknown setting 'unte'"),
        ("<hypernet:anime:1>", "hypernetworks are not supported"),
        ("<LORA:x:1>", r"<LORA:\.\.\.> extra networks are not supported"),
        ("<foo:bar>", "not supported"),
    ],
)
def test_malformed_and_unsupported_tags_name_the_tag(text: str, match: str) -> None:
    with pytest.raises(AdapterError, match=match) as info:
        parse_lora_tags(f"a cat, {text}")
    assert info.value.path is None
    with pytest.raises(AdapterError):
        strip_lora_tags(text)


def test_text_that_is_not_a_tag_is_left_alone() -> None:
    for text in ("a <3 cat", "x < y > z", "<lora>", "<:1>", "<lora:>"):
        assert parse_lora_tags(text) == (text, [])


def test_same_lora_at_two_strengths_is_an_error_across_prompt_and_negative() -> None:
    with pytest.raises(AdapterError, match=r"<lora:x:0.5> and <lora:x:0.8>.*different strengths"):
        parse_lora_tags("<lora:x:0.5> a <lora:x:0.8>")
    positive = parse_lora_tags("<lora:x:0.5> <lora:y>")[1]
    negative = parse_lora_tags("<lora:x:0.5:0.5> <lora:z:0.3>")[1]
    assert combine_lora_tags(positive, negative) == [LoraTag("x", 0.5, 0.5), LoraTag("y"), LoraTag("z", 0.3, 0.3)]
    with pytest.raises(AdapterError, match="different strengths"):
        combine_lora_tags(positive, parse_lora_tags("<lora:x:0.5:1>")[1])

"""A1111 attention syntax: table of cases, then properties over random input."""

from __future__ import annotations

import math
import random

import pytest

from engine.prompt_weights import BREAK, parse_prompt_attention

UP = 1.1
DOWN = 1 / 1.1  # A1111's multiplier for [ ]

CASES: list[tuple[str, list[tuple[str, float]]]] = [
    # plain text and empties
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("   ", [("   ", 1.0)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("(:1.5)", [("", 1.0)]),
    # single levels
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    ("a [minor] word", [("a ", 1.0), ("minor", DOWN), (" word", 1.0)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("(x:0.5)", [("x", 0.5)]),
    ("(x:-1)", [("x", -1.0)]),
    ("(x:0)", [("x", 0.0)]),
    ("(x:+2)", [("x", 2.0)]),
    ("(x:.5)", [("x", 0.5)]),
    ("(x:2.)", [("x", 2.0)]),
    ("(x: 1.3 )", [("x", 1.3)]),
    ("(x:\t-0.25\n)", [("x", -0.25)]),
    # nesting multiplies, inner bracket first, like A1111's floats
    ("((x))", [("x", 1.1 * 1.1)]),
    ("((x))", [("x", 1.2100000000000002)]),
    ("(((x)))", [("x", 1.1 * 1.1 * 1.1)]),
    ("[[x]]", [("x", DOWN * DOWN)]),
    ("([x])", [("x", 1.0)]),
    ("[(x)]", [("x", 1.0)]),
    ("((x:1.3))", [("x", 1.3 * 1.1)]),
    ("((x):1.3)", [("x", 1.1 * 1.3)]),
    ("(a (b) c)", [("a ", UP), ("b", UP * UP), (" c", UP)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", DOWN * 2.0), (" c", 2.0)]),
    # A1111's own documented examples
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # escapes: the backslash goes, the character stays literal
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\(x\\)", [("(x)", 1.0)]),
    ("\\[x\\]", [("[x]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("(\\(x\\))", [("(x)", UP)]),
    ("\\((x)", [("(", 1.0), ("x", UP)]),
    ("\\\\(x)", [("\\", 1.0), ("x", UP)]),
    ("emote \\o/", [("emote \\o/", 1.0)]),  # a backslash that escapes nothing stays
    ("trailing \\", [("trailing \\", 1.0)]),
    # unbalanced
    ("(unbalanced", [("unbalanced", UP)]),
    ("[unbalanced", [("unbalanced", DOWN)]),
    ("a (b [c", [("a ", 1.0), ("b ", UP), ("c", UP * DOWN)]),
    ("((a", [("a", UP * UP)]),
    ("a (b) (c", [("a ", 1.0), ("b", UP), (" ", 1.0), ("c", UP)]),
    ("a) b", [("a) b", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("(a)) b", [("a", UP), (") b", 1.0)]),
    ("x:1.5) y", [("x:1.5) y", 1.0)]),  # weight closer with nothing open is literal
    ("[a:1.5)", [("a:1.5)", DOWN)]),  # ...and does not close a "["
    ("(a [b:1.5) c]", [("a ", 1.5), ("b", 1.5 * DOWN), (" c", DOWN)]),  # per-kind stacks
    # ":" that is not a weight is literal
    ("(x:y)", [("x:y", UP)]),
    ("a: b", [("a: b", 1.0)]),
    ("(time: 12:30 pm)", [("time: 12:30 pm", UP)]),
    ("(time: 12:30)", [("time: 12", 30.0)]),  # the last ":<number>)" is a weight, as in A1111
    ("(a:1.2.3)", [("a:1.2.3", UP)]),
    ("(a:.)", [("a:.", UP)]),
    ("(a:-)", [("a:-", UP)]),
    ("(a:1e3)", [("a:1e3", UP)]),
    ("(a:1.5 b)", [("a:1.5 b", UP)]),
    ("(a::1.5)", [("a:", 1.5)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("a  BREAK\n b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("BREAK", [(BREAK, -1.0)]),
    ("a BREAK", [("a", 1.0), (BREAK, -1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), (BREAK, -1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("BREAKING news", [("BREAKING news", 1.0)]),
    ("NOBREAK", [("NOBREAK", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), (BREAK, -1.0), (",b", 1.0)]),
    ("(a) BREAK (b)", [("a", UP), (BREAK, -1.0), ("b", UP)]),
    ("(a BREAK b)", [("a", UP), (BREAK, -1.0), ("b", UP)]),  # break keeps -1.0 inside brackets
    ("(a BREAK b:1.5)", [("a", 1.5), (BREAK, -1.0), ("b", 1.5)]),
    # merging of adjacent equal weights
    ("(a)(b)", [("ab", UP)]),
    ("(a)b", [("a", UP), ("b", 1.0)]),
    ("a(b:1)c", [("abc", 1.0)]),
    ("(a:1.1)(b)", [("ab", UP)]),
    ("((a))(b:1.21)", [("a", 1.2100000000000002), ("b", 1.21)]),  # 1.1*1.1 != 1.21 in floats
]


@pytest.mark.parametrize(("prompt", "expected"), CASES)
def test_table(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    # Exact float equality: the weights must be A1111's products, bit for bit.
    assert [w for _, w in got] == [w for _, w in expected]


def test_result_types() -> None:
    got = parse_prompt_attention("a (b:2) BREAK c")
    assert isinstance(got, list)
    assert all(isinstance(item, tuple) and isinstance(item[0], str) and isinstance(item[1], float) for item in got)


def test_float_products_match_a1111() -> None:
    # ((x)) is 1.1 then *1.1 again, not 1.21; [[x]] uses 1/1.1 twice.
    assert parse_prompt_attention("((x))")[0][1] == 1.1 * 1.1 != 1.21
    assert parse_prompt_attention("[[x]]")[0][1] == (1 / 1.1) * (1 / 1.1)
    assert parse_prompt_attention("((((x))))")[0][1] == 1.1 * 1.1 * 1.1 * 1.1


# ---------------------------------------------------------------- fuzzing
_FUZZ_ALPHABET = list("ab ()[]:\\") + ["1.5", "-2", ".", "BREAK", " BREAK ", "\n", "é", "🐱"]


def _check_invariants(prompt: str, got: list[tuple[str, float]]) -> None:
    assert got, prompt
    if got == [("", 1.0)]:
        return
    for i, (text, weight) in enumerate(got):
        assert text, (prompt, got)  # no empty pieces
        assert isinstance(weight, float) and math.isfinite(weight), (prompt, got)
        if text == BREAK and weight == -1.0:
            continue
        if i > 0:
            prev_text, prev_weight = got[i - 1]
            # equal neighbours are merged (BREAK markers never merge)
            assert prev_weight != weight or (prev_text == BREAK and prev_weight == -1.0), (prompt, got)


def test_fuzz_never_raises() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        prompt = "".join(rng.choice(_FUZZ_ALPHABET) for _ in range(rng.randint(0, 25)))
        _check_invariants(prompt, parse_prompt_attention(prompt))


def _strip_syntax(prompt: str) -> str:
    """Expected text of a prompt made only of text and brackets (no "\\", ":", BREAK).

    Openers are always syntax; a closer is syntax only while one of its kind is open.
    """
    out: list[str] = []
    depth = {"(": 0, "[": 0}
    closer_of = {")": "(", "]": "["}
    for ch in prompt:
        if ch in depth:
            depth[ch] += 1
        elif ch in closer_of and depth[closer_of[ch]] > 0:
            depth[closer_of[ch]] -= 1
        else:
            out.append(ch)
    return "".join(out)


def test_fuzz_text_is_input_minus_syntax() -> None:
    rng = random.Random(99)
    alphabet = list("abc ()[]") + ["xy", ",", "\t"]
    for _ in range(3000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        got = parse_prompt_attention(prompt)
        _check_invariants(prompt, got)
        assert "".join(t for t, _ in got) == _strip_syntax(prompt), prompt


def test_fuzz_weights_are_bracket_products() -> None:
    """With balanced brackets and one-letter pieces, each letter's weight is 1.1**depth / 1.1**sqdepth."""
    rng = random.Random(7)
    for _ in range(1000):
        parts: list[str] = []
        expected: dict[int, tuple[int, int]] = {}
        stack: list[str] = []
        letter = 0
        for _ in range(rng.randint(1, 20)):
            op = rng.random()
            if op < 0.25:
                stack.append(rng.choice("(["))
                parts.append(stack[-1])
            elif op < 0.45 and stack:
                parts.append(")" if stack.pop() == "(" else "]")
            else:
                ch = chr(ord("a") + letter % 26)
                expected[letter] = (stack.count("("), stack.count("["))
                parts.append(ch)
                letter += 1
        parts.extend(")" if b == "(" else "]" for b in reversed(stack))
        prompt = "".join(parts)
        weights: list[float] = []
        for text, weight in parse_prompt_attention(prompt):
            weights.extend([weight] * len(text))
        assert len(weights) == letter, prompt
        for i, w in enumerate(weights):
            rounds, squares = expected[i]
            assert w == pytest.approx(1.1**rounds * (1 / 1.1) ** squares, rel=1e-12), prompt


def test_fuzz_escaped_text_is_literal() -> None:
    """Escaping every syntax character makes any text come back whole at weight 1."""
    rng = random.Random(5)
    alphabet = list("ab ()[]\\:,.") + ["1.5)", "é", "\n"]
    for _ in range(2000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        escaped = "".join("\\" + ch if ch in "()[]\\" else ch for ch in raw)
        assert parse_prompt_attention(escaped) == [(raw, 1.0)], escaped

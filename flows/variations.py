"""``{a|b}`` prompt variations: parsing and expanding them, every combination or seeded random picks."""

from __future__ import annotations

import itertools
import math
import random
from typing import Literal

__all__ = ["MAX_COMBINATIONS", "expand_variations"]

MAX_COMBINATIONS = 10_000

# Parsed form: a sequence is a list of items; an item is a str (literal) or a list of
# alternatives, each alternative itself a sequence.


def _parse_variations(text: str) -> list:
    root: list = []
    # stack of (alternatives of the open group, position of its '{')
    stack: list[tuple[list[list], int]] = []
    current = root
    buf: list[str] = []

    def flush() -> None:
        if buf:
            current.append("".join(buf))
            buf.clear()

    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "{}|":
            buf.append(text[i + 1])
            i += 2
            continue
        if ch == "{":
            flush()
            alternatives: list[list] = [[]]
            current.append(alternatives)
            stack.append((alternatives, i))
            current = alternatives[0]
        elif ch == "|" and stack:
            flush()
            alternatives = stack[-1][0]
            alternatives.append([])
            current = alternatives[-1]
        elif ch == "}":
            if not stack:
                raise ValueError(f"unbalanced '}}' at position {i}: no '{{' to close (write \\}} for a literal brace)")
            flush()
            stack.pop()
            current = _innermost(root, stack)
        else:
            buf.append(ch)
        i += 1
    if stack:
        raise ValueError(
            f"unbalanced '{{' at position {stack[-1][1]}: never closed (write \\{{ for a literal brace)"
        )
    flush()
    return root


def _innermost(root: list, stack: list[tuple[list[list], int]]) -> list:
    """The sequence new items go to after closing a group: the last alternative of the enclosing group."""
    return stack[-1][0][-1] if stack else root


def _combinations(seq: list) -> list[str]:
    parts: list[list[str]] = []
    for item in seq:
        if isinstance(item, str):
            parts.append([item])
        else:
            options: list[str] = []
            for alternative in item:
                options.extend(_combinations(alternative))
            parts.append(options)
        total = math.prod(len(p) for p in parts)
        if total > MAX_COMBINATIONS:
            raise ValueError(f"too many combinations (more than {MAX_COMBINATIONS}); use mode='random'")
    return ["".join(p) for p in itertools.product(*parts)]


def _pick(seq: list, rng: random.Random) -> str:
    out: list[str] = []
    for item in seq:
        if isinstance(item, str):
            out.append(item)
        else:
            out.append(_pick(rng.choice(item), rng))
    return "".join(out)


def expand_variations(
    text: str,
    *,
    mode: Literal["combinatorial", "random"] = "combinatorial",
    seed: int | None = None,
    count: int | None = None,
) -> list[str]:
    """Expand ``{a|b}`` variation groups.

    ``combinatorial``: every combination, the leftmost group varying slowest, options in written
    order (``"{red|blue} {cube|ball}"`` -> red cube, red ball, blue cube, blue ball); duplicates
    dropped keeping the first; ``count`` (if given) keeps the first ``count``; more than
    ``MAX_COMBINATIONS`` is a ValueError.
    ``random``: ``count`` (default 1) independent picks, each group choosing uniformly among its
    options with ``random.Random(seed)``: the same seed gives the same list. Picks may repeat.

    Groups nest (``{a {b|c}|d}``); ``{x}`` is just ``x``; an option may be empty (``{a|}``);
    ``\\{`` ``\\}`` ``\\|`` are literal characters (other backslashes, e.g. ``\\(`` for prompt weighting,
    are kept as written); ``|`` outside a group is literal. An unbalanced brace raises ValueError
    naming its 0-based position in ``text``.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    tree = _parse_variations(text)
    if mode == "combinatorial":
        seen: dict[str, None] = {}
        for s in _combinations(tree):
            seen.setdefault(s, None)
        result = list(seen)
        return result if count is None else result[:count]
    if mode == "random":
        rng = random.Random(seed)
        return [_pick(tree, rng) for _ in range(1 if count is None else count)]
    raise ValueError(f"unknown mode {mode!r} (expected 'combinatorial' or 'random')")

"""Parse A1111-style attention syntax into (text, weight) pieces.

What users type (AUTOMATIC1111 stable-diffusion-webui conventions):

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` by 1/1.1;
* ``(x:1.3)`` multiplies by the given number instead (negative and decimal
  numbers allowed); a ``:`` not followed by a number and ``)`` is plain text;
* nesting multiplies: ``((x))`` is 1.1 * 1.1;
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters;
* brackets still open at the end of the prompt close there; an unmatched
  ``)`` or ``]`` is plain text;
* the upper-case word ``BREAK`` ends the current 75-token chunk.

Weights are computed the way A1111 computes them — each closing bracket
multiplies, in order, the weight of every piece since its opening bracket —
so the float results are bit-for-bit the ones A1111 users see (for example
``((x))`` gives 1.2100000000000002, not 1.21).

Deliberate differences from A1111, where its behaviour is an accident:

* a weight that is not a valid number (``(x:1.2.3)``) is plain text; A1111
  raises ValueError on it;
* ``BREAK`` inside brackets is still a break with weight -1.0; A1111 scales its
  marker weight, after which it is no longer recognised as a break;
* adjacent ``BREAK`` items are kept separate rather than merged into one
  ``"BREAKBREAK"`` text piece;
* a backslash that escapes nothing is kept as text; A1111 drops it silently;
* pieces with empty text are dropped (except the lone ``("", 1.0)`` of an
  empty prompt), since they carry no tokens.
"""

from __future__ import annotations

import re

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # marker weight of a BREAK item (A1111's convention)

ROUND_MULTIPLIER = 1.1
# A1111 multiplies by the reciprocal rather than dividing by 1.1; keeping its
# arithmetic keeps the floats identical (e.g. for ``([x])``).
SQUARE_MULTIPLIER = 1 / 1.1

_TOKEN = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\])                    # \( \) \[ \] \\ : the literal character
    | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)   # :1.3) closes a ( with that multiplier
    | (?P<bracket>[()\[\]])
    | (?P<text>[^\\()\[\]:]+)                     # a run of ordinary text
    | (?P<other>[\\:])                            # a lone backslash or colon: plain text
    """,
    re.VERBOSE | re.DOTALL,
)
# BREAK as a separate upper-case word; the whitespace around it belongs to the break.
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


class _Piece:
    """A mutable (text, weight) piece while brackets are still being closed."""

    __slots__ = ("text", "weight", "is_break")

    def __init__(self, text: str, weight: float = 1.0, is_break: bool = False) -> None:
        self.text = text
        self.weight = weight
        self.is_break = is_break


def _multiply(pieces: list[_Piece], start: int, multiplier: float) -> None:
    # Everything appended since the bracket opened lies inside it. BREAK markers
    # keep their -1.0 so downstream code can always recognise them.
    for piece in pieces[start:]:
        if not piece.is_break:
            piece.weight *= multiplier


def _add_text(pieces: list[_Piece], text: str) -> None:
    parts = _BREAK_RE.split(text)
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append(_Piece(BREAK, BREAK_WEIGHT, is_break=True))
        if part:
            pieces.append(_Piece(part))


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` items; BREAK items are ``("BREAK", -1.0)``.

    Never raises on malformed input: anything that is not valid syntax is text.
    """
    pieces: list[_Piece] = []
    # Separate stacks per bracket kind, as in A1111: ``(a [b)]`` closes the
    # round bracket at ``)`` even though a square one opened inside it.
    round_open: list[int] = []
    square_open: list[int] = []

    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        token = match.group()
        if kind == "escape":
            pieces.append(_Piece(token[1]))
        elif kind == "weight":
            if round_open:
                _multiply(pieces, round_open.pop(), float(match.group("weight")))
            else:
                # No "(" to close: the whole ":1.3)" is literal, like a stray ")".
                pieces.append(_Piece(token))
        elif kind == "bracket":
            if token == "(":
                round_open.append(len(pieces))
            elif token == "[":
                square_open.append(len(pieces))
            elif token == ")" and round_open:
                _multiply(pieces, round_open.pop(), ROUND_MULTIPLIER)
            elif token == "]" and square_open:
                _multiply(pieces, square_open.pop(), SQUARE_MULTIPLIER)
            else:
                pieces.append(_Piece(token))  # unmatched closer: literal
        elif kind == "text":
            _add_text(pieces, token)
        else:  # lone "\" or ":"
            pieces.append(_Piece(token))

    # Unclosed brackets close at the end; same order as A1111 (round, then
    # square, outermost first) so the products round identically.
    for start in round_open:
        _multiply(pieces, start, ROUND_MULTIPLIER)
    for start in square_open:
        _multiply(pieces, start, SQUARE_MULTIPLIER)

    merged: list[_Piece] = []
    for piece in pieces:
        if not piece.text:
            continue
        prev = merged[-1] if merged else None
        if prev is not None and not prev.is_break and not piece.is_break and prev.weight == piece.weight:
            prev.text += piece.text
        else:
            merged.append(piece)

    if not merged:
        return [("", 1.0)]
    return [(p.text, p.weight) for p in merged]

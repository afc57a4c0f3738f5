"""The prompt blocklist (issue 24's content filter, its text half): terms an ad pipeline must never render.

A brief's text cells are checked when the brief is read (:func:`flows.brief.read_brief`: a problem on the row and
column, naming the term), and every prompt a template renders is checked when the row is planned (a template or a
style preset may add text: a problem naming the channel, the template and the term). Negative prompts are not
checked: they name what to avoid. A row with a hit is refused like any other bad row (skipped, or the brief
rejected under ``--strict``).

Terms come from the ``blocklist`` setting (a file, default ``templates/blocklist.txt``; ``""`` or ``off`` turns it
off) and from a brief's own ``blocked_terms`` column: its terms (``;`` or ``,`` separated) apply to every row of
the same campaign, whatever the setting says.

A list file has one term or phrase a line; ``#`` starts a comment; a trailing ``*`` matches any ending of the last
word (``behead*``: beheading, beheaded).

Text and terms are normalised the same way before they are compared:

1. Unicode NFKC, then casefold (full-width letters, ligatures, ``ß`` -> ``ss``);
2. accents stripped (NFKD, combining marks dropped: ``nüde`` -> ``nude``) and invisible format characters
   (zero-width spaces, soft hyphens, ...) removed;
3. the text is cut into words at every run of characters that are neither letters nor digits (``@`` and ``$``
   count as letters); a term matches whole words only (``classic`` does not hold ``ass``), and a phrase matches
   its words in order across any run of spaces or punctuation;
4. in a word with at least one letter, ``0 1 3 4 5 7 @ $`` read as ``o i e a s t a s`` (``p0rn``, ``$ex``); words
   of digits alone stay digits (``4 people`` is not ``a people``);
5. a word spelt one character at a time (two or more single characters in a row, any separators between them:
   ``n.u.d.e``, ``n u d e``, ``n-u-d-3``) is joined up and also matched as one word, anywhere in that run.

Not handled: look-alike letters from other scripts (Cyrillic ``а`` for Latin ``a``), repeated letters
(``nuuude``), words run together (``nudephoto``) or split in the middle (``nu de``); list such spellings as terms.

Matching is linear in the text: the words are found with one regex of single-character classes (no backtracking),
looked up by their first word in a dict, and a spelt-out run is looked up in slices no longer than the longest
term. A list is compiled once per file version (and per campaign's extra terms) and cached.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flows.brief_problems import BriefError, BriefProblem
from flows.safe_text import quoted

__all__ = [
    "BLOCKLIST_COLUMNS", "SHIPPED_BLOCKLIST", "UNCHECKED_COLUMNS", "Blocklist", "BlocklistError", "BlockedPrompt",
    "BriefFilter", "Term", "blocklist_for", "blocklist_label", "check_prompts", "load_blocklist", "split_terms",
]

SHIPPED_BLOCKLIST = Path(__file__).resolve().parent.parent / "templates" / "blocklist.txt"
BLOCKLIST_COLUMNS: tuple[str, ...] = ("blocked_terms",)
# Brief columns whose text never reaches a prompt or an image (numbers, files, names of things, switches) or
# names what to avoid; every other column (extra ones too, which templates may use) is checked.
UNCHECKED_COLUMNS = frozenset({
    "channels", "variants", "negative_prompt", "seed", "model", "license", "product_image", "product_mask",
    "placement", "control_image", "control_type", "control_strength", "control_start", "control_end", "brand",
    "fast", *BLOCKLIST_COLUMNS,
})
OFF = ("", "off")
MAX_TERM_CHARS = 100  # a term longer than this is no term (and would slow the spelt-out lookup)
_WORD = re.compile(r"(?:[^\W_]|[@$])+")
_LEET = str.maketrans("013457@$", "oieastas")
_TERM_SPLIT = re.compile(r"[;,\n]")


class BlocklistError(ValueError):
    """A blocklist file that cannot be used (unreadable, or a line that is no term); one line naming file:line."""


class BlockedPrompt(ValueError):
    """A rendered prompt that holds a blocked term; ``column`` is the brief column to blame."""

    column = "channels"


@dataclass(frozen=True)
class Term:
    text: str  # as written in the list or the cell
    words: tuple[str, ...]  # normalised
    prefix: bool  # a trailing ``*``: the last word may go on
    source: str  # where it comes from, for messages


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    return "".join(c for c in text if not unicodedata.combining(c) and unicodedata.category(c) != "Cf")


def _unleet(word: str) -> str:
    return word.translate(_LEET) if any(c.isalpha() for c in word) else word


def words(text: str) -> list[str]:
    """``text``'s normalised words (steps 1 to 4 of the module docstring)."""
    return [_unleet(w) for w in _WORD.findall(_fold(text))]


def parse_term(text: str, source: str) -> Term:
    """One term; ValueError (a message without the place) if it is none."""
    raw = text.strip()
    prefix = raw.endswith("*")
    body = raw[:-1] if prefix else raw
    if "*" in body:
        raise ValueError(f"term {quoted(raw, 40)}: '*' may only end a term")
    if len(body) > MAX_TERM_CHARS:
        raise ValueError(f"term {quoted(raw, 40)} is longer than {MAX_TERM_CHARS} characters")
    found = tuple(words(body))
    if not found:
        raise ValueError(f"term {quoted(raw, 40)} has no letters or digits")
    return Term(raw, found, prefix, source)


def _valid(text: str) -> bool:
    try:
        parse_term(text, "")
    except ValueError:
        return False
    return True


def split_terms(cell: str) -> list[str]:
    """The terms of a ``blocked_terms`` cell (``;``, ``,`` or a line break between them)."""
    return [t.strip() for t in _TERM_SPLIT.split(cell) if t.strip()]


class Blocklist:
    """Compiled terms; :meth:`find` gives the first term a text holds."""

    def __init__(self, terms: Iterable[Term]):
        self.terms = tuple(terms)
        self._first: dict[str, list[Term]] = {}  # first word -> terms (a one-word prefix term is in _prefixes)
        self._prefixes: dict[str, Term] = {}
        self._joined: dict[str, Term] = {}  # words joined, for spelt-out runs
        self._joined_prefixes: dict[str, Term] = {}
        for term in self.terms:
            if term.prefix and len(term.words) == 1:
                self._prefixes.setdefault(term.words[0], term)
            else:
                self._first.setdefault(term.words[0], []).append(term)
            (self._joined_prefixes if term.prefix else self._joined).setdefault("".join(term.words), term)
        self._longest = max((len(k) for k in (*self._joined, *self._joined_prefixes)), default=0)
        self._longest_prefix = max(map(len, self._prefixes), default=0)

    def __len__(self) -> int:
        return len(self.terms)

    def plus(self, terms: Iterable[Term]) -> Blocklist:
        return Blocklist((*self.terms, *terms))

    def find(self, text: str) -> Term | None:
        found = words(text)
        for i, word in enumerate(found):
            if hit := self._at(found, i, word):
                return hit
        return self._spelt(found)

    def _at(self, found: list[str], i: int, word: str) -> Term | None:
        for term in self._first.get(word, ()):
            n = len(term.words)
            if len(found) - i >= n and found[i:i + n - 1] == list(term.words[:-1]):
                last = found[i + n - 1]
                if last == term.words[-1] or (term.prefix and last.startswith(term.words[-1])):
                    return term
        for k in range(1, min(len(word), self._longest_prefix) + 1):
            if (term := self._prefixes.get(word[:k])) is not None:
                return term
        return None

    def _spelt(self, found: list[str]) -> Term | None:
        run: list[str] = []
        for word in (*found, ""):  # "" ends the last run
            if len(word) == 1:
                run.append(word)
                continue
            if len(run) >= 2 and (hit := self._in_run(_unleet("".join(run)))):
                return hit
            run = []
        return None

    def _in_run(self, joined: str) -> Term | None:
        for start in range(len(joined)):
            for end in range(start + 1, min(len(joined), start + self._longest) + 1):
                piece = joined[start:end]
                if (term := self._joined.get(piece) or self._joined_prefixes.get(piece)) is not None:
                    return term
        return None


def read_terms(lines: Iterable[str], source: str, where: Callable[[int], str]) -> list[Term]:
    terms = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                terms.append(parse_term(text, source))
            except ValueError as exc:
                raise BlocklistError(f"{where(number)}: {exc}") from None
    return terms


def blocklist_label(setting: str | None) -> str:
    """How messages name the list a setting gives."""
    path = SHIPPED_BLOCKLIST if setting is None else Path(setting)
    try:
        return f"blocklist {os.path.relpath(path)}"
    except ValueError:  # another drive (Windows)
        return f"blocklist {path}"


@lru_cache(maxsize=16)
def _load(path: str, stamp: tuple[int, int], label: str) -> Blocklist:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BlocklistError(f"{path}: cannot read blocklist: {getattr(exc, 'strerror', None) or exc}") from None
    return Blocklist(read_terms(text.splitlines(), label, lambda n: f"{path}:{n}"))


def load_blocklist(setting: str | None) -> Blocklist | None:
    """The list the ``blocklist`` setting names (None = the shipped one), or None when it is ``""`` / ``off``;
    compiled once per version of the file. BlocklistError if it cannot be read or holds a line that is no term."""
    if setting is not None and setting.strip().lower() in OFF:
        return None
    path = SHIPPED_BLOCKLIST if setting is None else Path(setting)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BlocklistError(f"{path}: cannot read blocklist: {exc.strerror or exc}") from None
    return _load(os.fspath(path), (st.st_mtime_ns, st.st_size), blocklist_label(setting))


@lru_cache(maxsize=64)
def _with_terms(setting: str | None, stamp: object, extra: tuple[str, ...]) -> Blocklist | None:
    base = load_blocklist(setting)
    terms = []
    for text in extra:
        try:
            terms.append(parse_term(text, "the campaign's blocked_terms"))
        except ValueError:
            pass  # reported on the row that wrote it
    if not terms:
        return base
    return Blocklist(terms) if base is None else base.plus(terms)


def blocklist_for(setting: str | None, extra: Sequence[str] = ()) -> Blocklist | None:
    """The setting's list plus a campaign's own terms (None: nothing to check)."""
    if not extra:
        return load_blocklist(setting)
    try:
        stamp = os.stat(SHIPPED_BLOCKLIST if setting is None else setting).st_mtime_ns
    except OSError:
        stamp = None  # off ("" / "off"), or a missing file, which load_blocklist reports
    return _with_terms(setting, stamp, tuple(extra))


class BriefFilter:
    """What :func:`flows.brief.read_brief` checks a brief's rows with: the setting's list and each campaign's terms
    (every ``blocked_terms`` cell of its rows)."""

    def __init__(self, setting: str | None, body: Sequence[tuple[int, list[str]]], first_at: Mapping[str, int],
                 file: str):
        self.setting = setting
        try:
            load_blocklist(setting)  # a broken file fails the brief here, before any row is read
        except BlocklistError as exc:
            raise BriefError([BriefProblem(file, None, None, str(exc))]) from None
        self.terms: dict[str, dict[str, None]] = {}
        col, camp = first_at.get(BLOCKLIST_COLUMNS[0]), first_at["campaign"]
        for _, cells in body if col is not None else ():
            if col < len(cells) and cells[col]:
                campaign = cells[camp] if camp < len(cells) else ""
                self.terms.setdefault(campaign, {}).update(dict.fromkeys(t for t in split_terms(cells[col]) if _valid(t)))

    def check(self, values: Mapping[str, str], bad: Callable[[str, str], None]) -> tuple[str, ...]:
        """Report the row's blocked terms and bad ``blocked_terms`` to ``bad(column, message)``; the campaign's
        terms (kept on the row, for the prompts planning renders)."""
        for text in split_terms(values.get(BLOCKLIST_COLUMNS[0], "")):
            try:
                parse_term(text, "")
            except ValueError as exc:
                bad(BLOCKLIST_COLUMNS[0], str(exc))
        extra = tuple(self.terms.get(values["campaign"], ()))
        blocklist = blocklist_for(self.setting, extra)
        if blocklist is not None:
            for column, text in values.items():
                if text and column not in UNCHECKED_COLUMNS and (term := blocklist.find(text)) is not None:
                    bad(column, f"holds the blocked term {quoted(term.text, 40)} ({term.source})")
        return extra


def check_prompts(setting: str | None, extra: Sequence[str], channel: str, prompts: Sequence) -> None:
    """BlockedPrompt for the first rendered prompt (a :class:`flows.templating.PromptVariant`) holding a blocked
    term; its negative prompt is not checked."""
    blocklist = blocklist_for(setting, extra)
    if blocklist is None:
        return
    for p in prompts:
        if (term := blocklist.find(p.prompt)) is not None:
            raise BlockedPrompt(f"the prompt template {quoted(p.template_name, 40)} renders for channel "
                                f"{quoted(channel, 40)} holds the blocked term {quoted(term.text, 40)} ({term.source})")

"""The prompt blocklist (flows/content_filter.py): what it matches (each normalisation), what it must not match,
its cost on abusive text, and where it applies: brief cells by row and column (CSV and XLSX), a campaign's own
``blocked_terms``, the ``blocklist`` setting (a file, or off) and prompts a template or style adds at planning."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.brief import BriefError, read_brief
from flows.content_filter import SHIPPED_BLOCKLIST, Blocklist, BlocklistError, load_blocklist, parse_term
from flows.model_registry import describe_model
from flows.planning import plan_brief
from flows.settings import SettingsError, load_settings
from flows.styles import StylePreset
from tests.flows.xlsx_parts import row as xrow, sheet, write_xlsx
from tests.helpers import write_text


def blocklist(*terms: str) -> Blocklist:
    return Blocklist(parse_term(t, "test list") for t in terms)


TERMS = blocklist("nude", "naked", "porn*", "sex", "behead*", "explicit sex", "ass", "kkk", "white power")


@pytest.mark.parametrize("text, term", [
    ("a nude model", "nude"),
    ("NUDE", "nude"),
    ("a nüde look", "nude"),  # accents stripped
    ("ｎａｋｅｄ", "naked"),  # full-width letters (NFKC)
    ("na\u200bked", "naked"),  # a zero-width space inside the word
    ("nak\u00adéd", "naked"),  # a soft hyphen and an accent
    ("n.u.d.e beach", "nude"),  # spelt out with separators
    ("n u d e", "nude"),
    ("a n-u-d-3 shot", "nude"),  # spelt out, with a digit swap, inside a longer run
    ("p0rn", "porn*"),  # 0 -> o, and a prefix term
    ("pornographic", "porn*"),
    ("$ex", "sex"),  # $ -> s
    ("5ex appeal", "sex"),  # 5 -> s
    ("n4k3d", "naked"),  # 4 -> a, 3 -> e
    ("nak3d", "naked"),
    ("@ss", "ass"),  # @ -> a
    ("beheaded king", "behead*"),
    ("Explicit   --  SEX!", "explicit sex"),  # a phrase across any run of spaces and punctuation
    ("explicit\nsex", "explicit sex"),
    ("k.k.k", "kkk"),
    ("w h i t e p o w e r", "white power"),  # a phrase spelt out
    ("white_power", "white power"),  # "_" separates words too
])
def test_blocked_spellings_are_caught(text: str, term: str) -> None:
    hit = TERMS.find(text)
    assert hit is not None and hit.text == term


@pytest.mark.parametrize("text", [
    "Scunthorpe United", "a classic bass guitar", "therapist", "Essex", "sextant", "unisex",  # words holding terms
    "nudes",  # a term without '*' matches the whole word only
    "nu de",  # split in the middle: not one word spelt out
    "sizes S, M, L and XL", "A/B test", "4 people", "1 2 3 4 5 7",  # single characters that spell no term
    "2024 model", "$5 off", "email us @ home",  # digits and symbols alone stay what they are
    "explicit instructions, sexy", "white powder", "power white",  # a phrase needs its words, in order, whole
    "be heading north",
])
def test_no_false_positives(text: str) -> None:
    assert TERMS.find(text) is None


class _CountingDict(dict):
    """A lookup table that counts its lookups: the matcher's work, measured without a clock."""

    lookups = 0

    def get(self, key, default=None):
        _CountingDict.lookups += 1
        return super().get(key, default)


def test_work_is_bounded_on_abusive_text_and_long_lists() -> None:
    """Matching costs a bounded number of table lookups per character of text, however long the list: no pattern
    backtracking, no scan of the list per word."""
    many = Blocklist(parse_term(f"term{i} word{i}*", "big") for i in range(5000))
    for table in ("_first", "_prefixes", "_joined", "_joined_prefixes"):
        setattr(many, table, _CountingDict(getattr(many, table)))
    texts = ["a " * 5000, "x" * 10_000, "n a k " * 1600, ("ab" * 40 + " ") * 120, "(" * 10_000, "term1 " * 1600]
    for text in texts:
        _CountingDict.lookups = 0
        assert many.find(text) is None
        assert _CountingDict.lookups <= 4 * many._longest * len(text) + 100, (text[:20], _CountingDict.lookups)
        assert TERMS.find(text) is None
    assert many.find("so term4999 word4999s") is not None


def test_the_shipped_list_loads_and_is_the_default() -> None:
    shipped = load_blocklist(None)
    assert shipped is not None and len(shipped) >= 20 and SHIPPED_BLOCKLIST.name == "blocklist.txt"
    assert shipped.find("a naked man") is not None and shipped.find("graphic gore") is not None
    for ordinary in ("a Gore-Tex jacket, torture-tested", "nude lipstick", "sexy new sedan", "classic Scunthorpe pub"):
        assert shipped.find(ordinary) is None, ordinary
    assert load_blocklist("off") is None and load_blocklist("") is None


def test_a_bad_list_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    bad = write_text(tmp_path / "list.txt", "# comment\nfine term\n%%%\n")
    with pytest.raises(BlocklistError, match=rf"{bad}:3: term '%%%' has no letters or digits"):
        load_blocklist(str(bad))
    with pytest.raises(BlocklistError, match="cannot read blocklist"):
        load_blocklist(str(tmp_path / "missing.txt"))
    with pytest.raises(SettingsError, match="'blocklist':.*missing.txt: cannot read blocklist"):
        load_settings({"blocklist": "missing.txt"}, env={}, cwd=tmp_path)


def test_the_setting_resolves_paths_and_off(tmp_path: Path) -> None:
    write_text(tmp_path / "ours.txt", "zebra\n")
    assert load_settings({}, env={}, cwd=tmp_path).blocklist is None
    assert load_settings({"blocklist": "ours.txt"}, env={}, cwd=tmp_path).blocklist == (tmp_path / "ours.txt").resolve().as_posix()
    assert load_settings({"blocklist": "OFF"}, env={}, cwd=tmp_path).blocklist == ""
    assert load_settings({}, env={"ADFORGE_BLOCKLIST": "off"}, cwd=tmp_path).blocklist == ""
    write_text(tmp_path / "adforge.toml", 'blocklist = ""\n')
    assert load_settings({}, env={}, cwd=tmp_path).blocklist == ""


# ------------------------------------------------------------------------------------------------ briefs

CSV = ("campaign,row_id,subject,message,negative_prompt,channels,tagline\n"
       "spring,ok,a red shoe,on a beach,,banner,\n"
       "spring,bad,a red shoe,a N.A.K.E.D runner,,banner,\n"
       "spring,neg,a red shoe,on a track,naked,banner,\n"  # a negative prompt names what to avoid
       "spring,extra,a red shoe,,,banner,decapitated\n")  # an extra column reaches templates: checked


def test_a_blocked_term_is_refused_by_row_and_column_csv(tmp_path: Path) -> None:
    p = write_text(tmp_path / "b.csv", CSV)
    brief = read_brief(p)
    assert [r.row_id for r in brief.rows] == ["ok", "neg"]
    assert [str(x) for x in brief.problems] == [
        f"{p}:3: column 'message': holds the blocked term 'naked' (blocklist {_rel(SHIPPED_BLOCKLIST)})",
        f"{p}:5: column 'tagline': holds the blocked term 'decapitat*' (blocklist {_rel(SHIPPED_BLOCKLIST)})",
    ]
    with pytest.raises(BriefError, match="column 'message': holds the blocked term 'naked'"):
        read_brief(p, strict=True)
    # off: the shipped terms pass
    assert [r.row_id for r in read_brief(p, blocklist="off").rows] == ["ok", "bad", "neg", "extra"]


def test_a_blocked_term_is_refused_by_row_and_column_xlsx(tmp_path: Path) -> None:
    p = write_xlsx(tmp_path / "b.xlsx", sheet([
        xrow(1, "campaign", "row_id", "subject", "channels"),
        xrow(2, "spring", "ok", "a red shoe", "banner"),
        xrow(3, "spring", "bad", "a topless p0rn star", "banner"),
    ]))
    brief = read_brief(p)
    assert [r.row_id for r in brief.rows] == ["ok"]
    assert [str(x) for x in brief.problems] == [
        f"{p}:3: column 'subject': holds the blocked term 'topless' (blocklist {_rel(SHIPPED_BLOCKLIST)})"]


def test_a_campaigns_own_terms_apply_to_all_its_rows_even_with_the_list_off(tmp_path: Path) -> None:
    p = write_text(tmp_path / "b.csv", "campaign,row_id,subject,channels,blocked_terms\n"
                                       "spring,r1,a red shoe,banner,acme; rival brand\n"
                                       "spring,r2,a shoe like ACMÉ makes,banner,\n"
                                       "spring,r3,a shoe better than the Rival-Brand one,banner,\n"
                                       "autumn,r4,an acme shoe,banner,\n"  # another campaign: its terms are its own
                                       "autumn,r5,a coat,banner,%%%\n")
    for setting in (None, "off"):
        brief = read_brief(p, blocklist=setting)
        assert [r.row_id for r in brief.rows] == ["r1", "r4"]
        assert brief.rows[0].blocked_terms == ("acme", "rival brand") and brief.rows[1].blocked_terms == ()
        assert [str(x) for x in brief.problems] == [
            f"{p}:3: column 'subject': holds the blocked term 'acme' (the campaign's blocked_terms)",
            f"{p}:4: column 'subject': holds the blocked term 'rival brand' (the campaign's blocked_terms)",
            f"{p}:6: column 'blocked_terms': term '%%%' has no letters or digits",
        ]
        assert "blocked_terms" not in brief.rows[0].extra  # not a template variable


def test_an_operators_list_replaces_the_shipped_one(tmp_path: Path) -> None:
    ours = write_text(tmp_path / "ours.txt", "# our list\nzebra  # a comment after a term\n")
    p = write_text(tmp_path / "b.csv", "campaign,row_id,subject,channels\ns,r1,a naked zebra,banner\n")
    (problem,) = read_brief(p, blocklist=str(ours)).problems
    assert str(problem).endswith(f"column 'subject': holds the blocked term 'zebra' (blocklist {_rel(ours)})")
    with pytest.raises(BriefError, match="cannot read blocklist"):
        read_brief(p, blocklist=str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------------------ planning


def test_a_term_a_style_preset_adds_is_caught_at_planning(tmp_path: Path, channels, styles, campaign_model: Path) -> None:
    p = write_text(tmp_path / "b.csv", "campaign,row_id,subject,style,channels,variants,blocked_terms\n"
                                       "s,grim,a red shoe,grim,banner,1,\n"
                                       "s,clean,a red shoe,clean,banner,1,\n"
                                       "s,own,a red shoe,mascot,banner,1,acme\n")
    brief = read_brief(p, known_channels=set(channels))
    assert [r.row_id for r in brief.rows] == ["grim", "clean", "own"]  # the cells hold no blocked term
    presets = {**styles, "grim": StylePreset("grim", "dark mood, graphic gore", "blur"),
               "mascot": StylePreset("mascot", "the Acme mascot", "")}
    settings = load_settings({"model_dirs": str(campaign_model.parent)}, env={}, cwd=tmp_path)

    def plan(settings):
        return plan_brief(brief, settings, channels=channels, styles=presets, resolve_model=describe_model,
                          default_model=campaign_model)

    the_plan = plan(settings)
    assert {v.row.row_id for v in the_plan.variants} == {"clean"}
    messages = [str(x) for x in the_plan.problems]
    assert messages[0].startswith(f"{p}:2: column 'channels': the prompt template ") and (
        "renders for channel 'banner' holds the blocked term 'graphic gore'" in messages[0])
    assert messages[1].startswith(f"{p}:4: column 'channels':") and "'acme' (the campaign's blocked_terms)" in messages[1]
    off = plan(load_settings({"model_dirs": str(campaign_model.parent), "blocklist": "off"}, env={}, cwd=tmp_path))
    assert {v.row.row_id for v in off.variants} == {"grim", "clean"}  # the campaign's own term still applies
    with pytest.raises(BriefError):
        plan_brief(brief, settings, channels=channels, styles=presets, resolve_model=describe_model,
                   default_model=campaign_model, strict=True)


def _rel(path: Path) -> str:
    import os

    return os.path.relpath(path)

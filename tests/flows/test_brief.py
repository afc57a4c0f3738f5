from __future__ import annotations

from pathlib import Path

import openpyxl
import pytest

from flows.brief import BriefError, BriefProblem, derive_seed, read_brief
from tests.flows.xlsx_parts import row, sheet, write_xlsx
from tests.helpers import EXAMPLE_BRIEFS as EXAMPLES

CHANNELS = ("instagram_square", "story", "banner")
HEADER = "campaign,row_id,subject,channels"


def write(tmp_path: Path, text: str, name: str = "brief.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def messages(exc_info: pytest.ExceptionInfo[BriefError]) -> list[str]:
    return [str(p) for p in exc_info.value.problems]


# --------------------------------------------------------------------------- the example brief


def test_example_csv_and_xlsx_give_identical_rows():
    csv_brief = read_brief(EXAMPLES / "spring-launch.csv", known_channels=CHANNELS, strict=True)
    xlsx_brief = read_brief(EXAMPLES / "spring-launch.xlsx", known_channels=CHANNELS, strict=True)
    assert csv_brief.rows == xlsx_brief.rows
    assert len(csv_brief.rows) == 4
    assert csv_brief.problems == [] and csv_brief.encoding == "utf-8" and xlsx_brief.encoding is None
    assert len(csv_brief.sha256) == 64 and csv_brief.sha256 != xlsx_brief.sha256
    hero, teaser = csv_brief.rows[:2]
    assert hero.campaign == "spring-launch-2025" and hero.row_id == "hero-01" and hero.line == 2
    assert hero.channels == ("instagram_square", "story", "banner")
    assert teaser.channels == ("story", "banner")  # semicolon-separated inside the cell
    assert hero.variants == 4 and hero.model is None and hero.license == "commercial"
    assert teaser.negative_prompt == "blurry, text, watermark"
    assert [r.extra for r in csv_brief.rows][0] == {"tagline": "Fresh for spring"}
    assert all(2 <= r.variants <= 4 and r.style for r in csv_brief.rows)


def test_derived_seeds_are_stable_and_differ_per_row():
    rows = read_brief(EXAMPLES / "spring-launch.csv").rows
    assert [r.seed for r in rows] == [derive_seed(r.campaign, r.row_id) for r in rows]
    assert len({r.seed for r in rows}) == len(rows)
    assert all(0 <= r.seed < 2**31 for r in rows)
    # first 4 bytes of sha256(b"spring\x00r1"), top bit cleared
    assert derive_seed("spring", "r1") == derive_seed("spring", "r1") == 0x5B0CF8DE
    assert derive_seed("spring", "r1") != derive_seed("spring", "r2") != derive_seed("sprin", "gr2")


# --------------------------------------------------------------------------- encodings and dialects


def test_bom_semicolon_and_header_spelling(tmp_path):
    text = "Campaign;Row ID;SUBJECT;Channels;Negative-Prompt;Seed\r\nspring;r1;a red circle;story, banner;blurry;7\r\n"
    brief = read_brief(write(tmp_path, text, encoding="utf-8-sig"), strict=True)
    assert brief.encoding == "utf-8-sig"
    (row,) = brief.rows
    assert (row.campaign, row.row_id, row.channels, row.negative_prompt, row.seed) == (
        "spring", "r1", ("story", "banner"), "blurry", 7
    )


@pytest.mark.parametrize("encoding, bom, name", [("utf-16-le", b"\xff\xfe", "utf-16-le"),
                                                 ("utf-16-be", b"\xfe\xff", "utf-16-be")])
def test_utf16_with_bom_is_read(tmp_path, encoding, bom, name):
    """Excel's "Unicode Text" and some exports are UTF-16 with a byte-order mark (it was called "binary")."""
    text = f"{HEADER}\r\nspring,r1,Caf\u00e9 \u2615,story\r\n"
    p = tmp_path / "brief.csv"
    p.write_bytes(bom + text.encode(encoding))
    brief = read_brief(p, strict=True)
    assert brief.encoding == name and brief.rows[0].subject == "Caf\u00e9 \u2615"


def test_utf16_without_bom_and_broken_utf16_are_named(tmp_path):
    p = write(tmp_path, f"{HEADER}\nspring,r1,a cat,story\n", encoding="utf-16-le")
    with pytest.raises(BriefError) as exc_info:
        read_brief(p)
    assert messages(exc_info) == [f"{p}: cannot read file: it is binary, not CSV text"]
    p.write_bytes(b"\xff\xfe" + HEADER.encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate
    with pytest.raises(BriefError) as exc_info:
        read_brief(p)
    assert messages(exc_info) == [f"{p}: cannot read file: not valid UTF-16-LE text (byte {len(HEADER) * 2 + 2})"]


def test_cr_line_endings_and_quoted_line_breaks(tmp_path):
    """Old Mac exports end lines with CR alone; a quoted cell may span lines (later lines keep their numbers)."""
    p = write(tmp_path, f"{HEADER},message\rspring,r1,a cat,story,\"two\r\nlines\"\rspring,r2,a dog,story,\r")
    brief = read_brief(p, strict=True)
    assert [(r.row_id, r.message, r.line) for r in brief.rows] == [("r1", "two\r\nlines", 2), ("r2", "", 4)]


def test_cp1252_fallback(tmp_path):
    text = f"{HEADER},message\nspring,r1,Caf\u00e9 cr\u00e8me,story,\u201cFresh\u201d \u2013 for \u20ac5\n"
    brief = read_brief(write(tmp_path, text, encoding="cp1252"), strict=True)
    assert brief.encoding == "cp1252" and brief.problems == []
    assert brief.rows[0].subject == "Caf\u00e9 cr\u00e8me"
    assert brief.rows[0].message == "\u201cFresh\u201d \u2013 for \u20ac5"


def test_whitespace_blank_lines_and_extra_columns(tmp_path):
    text = (
        f"\n{HEADER}, Tag Line ,cta\n\n"
        "  spring , r1 , a red circle ,  Story  ,  Fresh!  ,\n,,,,,\nspring,r2,a blue star,banner,,Buy\n"
    )
    brief = read_brief(write(tmp_path, text), strict=True)
    r1, r2 = brief.rows
    assert (r1.campaign, r1.row_id, r1.subject, r1.channels, r1.line) == ("spring", "r1", "a red circle", ("story",), 4)
    assert r1.extra == {"tag_line": "Fresh!", "cta": ""}
    assert r2.extra == {"tag_line": "", "cta": "Buy"} and r2.line == 6


def test_xlsx_whole_floats_empty_rows_and_text_cells(tmp_path):
    p = tmp_path / "brief.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["campaign", "row_id", "subject", "channels", "variants", "seed"])
    ws.append(["spring", "007", "a red circle", "story", 4.0, 12.0])
    ws.append([])
    ws.append(["spring", 8, "a blue star", "banner", 2.5, None])
    wb.save(p)
    brief = read_brief(p)
    (row,) = brief.rows
    assert (row.row_id, row.variants, row.seed, row.line) == ("007", 4, 12, 2)
    assert [str(x) for x in brief.problems] == [f"{p}:4: column 'variants': '2.5' is not a whole number"]


# --------------------------------------------------------------------------- problems


def test_every_bad_value_is_reported_with_file_line_and_column(tmp_path):
    text = (
        f"{HEADER},variants,seed,license\n"
        "spring,r1,a red circle,story,four,,\n"
        "spring,r2,,story,-2,-1,free\n"
        "spring,r3,a star,tiktok; banner,2,9223372036854775808,ANY\n"
        "spring,r4,a square,,,,\n"
        "spring,r5,a square,story,3,42,Any\n"
    )
    p = write(tmp_path, text, name="spring.csv")
    brief = read_brief(p, known_channels=CHANNELS)
    assert [str(x) for x in brief.problems] == [
        f"{p}:2: column 'variants': 'four' is not a whole number",
        f"{p}:3: column 'subject': required value is empty",
        f"{p}:3: column 'variants': '-2' must be at least 1",
        f"{p}:3: column 'seed': '-1' must not be negative",
        f"{p}:3: column 'license': unknown licence 'free' (expected 'commercial' or 'any')",
        f"{p}:4: column 'channels': unknown channel 'tiktok' (known: banner, instagram_square, story)",
        f"{p}:4: column 'seed': '9223372036854775808' is too large (must be below 2**63)",
        f"{p}:5: column 'channels': required value is empty",
    ]
    assert brief.problems[0] == BriefProblem(str(p), 2, "variants", "'four' is not a whole number")
    (row,) = brief.rows
    assert (row.row_id, row.variants, row.seed, row.license) == ("r5", 3, 42, "any")


def test_duplicate_row_ids_name_both_lines_and_drop_both_rows(tmp_path):
    text = f"{HEADER}\nspring,r1,a red circle,story\nspring,r2,a star,story\nspring,R1,a square,banner\n"
    p = write(tmp_path, text)
    brief = read_brief(p)
    assert [str(x) for x in brief.problems] == [f"{p}:4: column 'row_id': duplicate row_id 'R1' (also on line 2)"]
    assert [r.row_id for r in brief.rows] == ["r2"]


def test_strict_raises_on_any_problem_default_keeps_good_rows(tmp_path):
    p = write(tmp_path, f"{HEADER},variants\nspring,r1,a red circle,story,x\nspring,r2,a star,story,2\n")
    assert [r.row_id for r in read_brief(p).rows] == ["r2"]
    with pytest.raises(BriefError) as exc_info:
        read_brief(p, strict=True)
    assert str(exc_info.value) == f"{p}:2: column 'variants': 'x' is not a whole number"


def test_missing_required_columns_raise_even_when_not_strict(tmp_path):
    p = write(tmp_path, "Campaign,Product,channels\nspring,a red circle,story\n")
    with pytest.raises(BriefError) as exc_info:
        read_brief(p)
    assert str(exc_info.value) == (
        f"{p}: column 'row_id': required column is missing\n{p}: column 'subject': required column is missing"
    )


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", b"", "{p}: file is empty: no header row"),
        ("blank.csv", b"\n \n,,\n", "{p}: file is empty: no header row"),
        ("header.csv", HEADER.encode() + b"\n", "{p}: brief has a header but no rows"),
        ("brief.txt", b"x", "{p}: unsupported file type '.txt' (expected .csv or .xlsx)"),
        ("binary.csv", b"PK\x03\x04\x00\x00", "{p}: cannot read file: it is binary, not CSV text"),
        ("bad.csv", b"campaign\n\x81\x8d\xff\n", "{p}: cannot read file: neither UTF-8 nor cp1252 text (byte 9)"),
        ("fake.xlsx", b"not a zip", "{p}: cannot read file: not a readable .xlsx workbook (File is not a zip file)"),
    ],
)
def test_file_level_problems(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(BriefError) as exc_info:
        read_brief(p)
    assert messages(exc_info) == [expected.format(p=p)]


def test_missing_file_is_named(tmp_path):
    p = tmp_path / "nope.csv"
    with pytest.raises(BriefError) as exc_info:
        read_brief(p)
    assert messages(exc_info) == [f"{p}: cannot read file: No such file or directory"]
    assert isinstance(exc_info.value, ValueError)


def test_header_problems(tmp_path):
    p = write(tmp_path, f"{HEADER},Row-ID,\nspring,r1,a red circle,story,r1b,oops\n")
    with pytest.raises(BriefError) as exc_info:
        read_brief(p)
    assert messages(exc_info) == [
        f"{p}:1: column 'row_id': appears twice (columns 2 and 5)",
        f"{p}:1: column 6 has values but no header",
    ]


# --------------------------------------------------------------------------- formulas and what reaches a terminal


def test_xlsx_formulas_give_their_saved_value_or_a_warning_naming_the_cell(tmp_path):
    """A formula saved with its result (Excel, LibreOffice) reads as that result; one saved without (a file written
    by a program that does not calculate) reads as empty with a warning: sheet, cell, line, column. The row stays."""
    header = row(1, "campaign", "row_id", "subject", "channels", "variants", "tagline")
    p = write_xlsx(tmp_path / "formulas.xlsx", sheet([
        header,
        row(2, "spring", "r1", ("=", 'CONCAT("a ","cat")', "a cat"), "story", ("=", "1+2", 3), "x"),
        row(3, "spring", "r2", "a dog", "story", ("=", "A1*2", None), ("=", "B1", None)),
    ]), sheet_name="Q1 brief")
    brief = read_brief(p, strict=True)
    assert [(r.row_id, r.subject, r.variants, r.extra) for r in brief.rows] == [
        ("r1", "a cat", 3, {"tagline": "x"}), ("r2", "a dog", 4, {"tagline": ""})]
    assert [str(w) for w in brief.warnings] == [
        f"{p}:3: column 'variants': sheet 'Q1 brief' cell E3: formula '=A1*2' has no saved value and reads as empty "
        "(open and save the workbook in Excel to store its result, or type the value)",
        f"{p}:3: column 'tagline': sheet 'Q1 brief' cell F3: formula '=B1' has no saved value and reads as empty "
        "(open and save the workbook in Excel to store its result, or type the value)",
    ]
    assert brief.problems == []


def test_openpyxl_written_formulas_warn_too(tmp_path):
    p = tmp_path / "brief.xlsx"
    wb = openpyxl.Workbook()
    wb.active.append(["campaign", "row_id", "subject", "channels", "seed"])
    wb.active.append(["spring", "r1", "a cat", "story", "=6*7"])
    wb.save(p)
    brief = read_brief(p)
    assert brief.rows[0].seed == derive_seed("spring", "r1")
    [warning] = brief.warnings
    assert (warning.line, warning.column) == (2, "seed") and "cell E2: formula '=6*7' has no saved value" in warning.message


def test_control_characters_in_cells_never_reach_a_message_raw(tmp_path):
    """An ANSI sequence (or a newline) in a cell that a problem quotes is shown escaped, on one line."""
    p = write(tmp_path, f"{HEADER},variants\nspring,r1,a cat,story,\"\x1b[2J\x1b[1Afour\r\nlines\"\n")
    [problem] = [str(x) for x in read_brief(p).problems]
    assert problem == f"{p}:2: column 'variants': '\\x1b[2J\\x1b[1Afour\\r\\nlines' is not a whole number"
    assert "\x1b" not in problem and "\n" not in problem


def test_streaming_xlsx_reader_matches_openpyxl_cell_for_cell(tmp_path):
    """Our streaming .xlsx reader against an independent one: openpyxl reads the same workbook (every kind of cell
    openpyxl writes: shared strings with non-Latin text, numbers, whole floats, booleans, dates, datetimes, a
    gap in a row, a formula with no saved value), and each extra column's value is openpyxl's, shown the same way."""
    import datetime as dt

    from flows.xlsx_reader import cell_text

    p = tmp_path / "types.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    header = ["campaign", "row_id", "subject", "channels", "text", "number", "whole", "flag", "day", "moment", "gap",
              "after_gap"]
    ws.append(header)
    rows = [
        ["spring", "r1", "a red circle", "story", "Größe ✓ 日本", 3.25, 7.0, True, dt.date(2026, 3, 1),
         dt.datetime(2026, 3, 1, 14, 30, 5), None, "x"],
        ["spring", "r2", "a blue star", "story", "  padded  ", -0.001, 12, False, dt.date(1999, 12, 31),
         dt.datetime(2026, 1, 2, 0, 0), None, 5],
    ]
    for r in rows:
        ws.append(r)
    wb.save(p)

    ours = read_brief(p).rows
    reference = openpyxl.load_workbook(p, read_only=True, data_only=True).active
    theirs = [[cell_text(c) for c in r] for r in reference.iter_rows(min_row=2, values_only=True)]
    assert len(ours) == len(theirs) == 2
    for row, expected in zip(ours, theirs, strict=True):
        for name, value in zip(header[4:], expected[4:], strict=True):
            assert row.extra[name] == value.strip(), (name, row.extra[name], value)

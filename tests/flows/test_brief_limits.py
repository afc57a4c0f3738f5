"""Brief limits (issue 28): each probe at a small size, refused by the mechanism that bounds the full-size one
(bench/abuse_brief.py runs them at full size): the file's size before it is read, an .xlsx's unpacked size from
its zip directory, rows / cells / characters per cell as they stream in, variants per row and per brief before
anything is planned, database column lengths, digit counts and seed ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.brief import BriefError, BriefLimits, read_brief
from flows.brief_limits import COLUMN_LENGTHS
from tests.flows.xlsx_parts import row, shared_strings, sheet, write_xlsx

HEADER = "campaign,row_id,subject,channels"


def write(tmp_path: Path, text: str, name: str = "brief.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def refused(path: Path, **limits: int) -> list[str]:
    with pytest.raises(BriefError) as info:
        read_brief(path, limits=BriefLimits(**limits))
    return [str(p) for p in info.value.problems]


# ------------------------------------------------------------------------------------------------ file size


def test_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A sparse file one byte over the default 16 MiB: refused from its size (reading it would take 16 MiB)."""
    p = tmp_path / "huge.csv"
    with open(p, "wb") as f:
        f.truncate(16 * 2**20 + 1)
    assert refused(p) == [f"{p}: cannot read file: it is 16777217 bytes, more than the 16777216 allowed "
                          "(setting brief_max_bytes)"]
    small = write(tmp_path, f"{HEADER}\nc,r1,a cat,story\n")
    assert refused(small, max_bytes=10) == [f"{small}: cannot read file: it is 50 bytes, more than the 10 allowed "
                                            "(setting brief_max_bytes)"]


# ------------------------------------------------------------------------------------------------ rows, cells, cell length


def test_rows_past_the_cap_stop_the_read_at_that_row(tmp_path: Path) -> None:
    """Blank lines do not count; the 11th row (line 13) is the first one past a cap of 10."""
    rows = "".join(f"c,r{i},a cat,story\n" for i in range(50))
    p = write(tmp_path, f"{HEADER}\n\n{rows}")
    assert refused(p, max_rows=10) == [f"{p}:13: the brief has more than 10 rows (setting brief_max_rows); "
                                       "reading stopped here"]
    assert len(read_brief(p, limits=BriefLimits(max_rows=50)).rows) == 50


def test_xlsx_rows_stream_and_stop_before_the_rest_of_the_sheet_is_read(tmp_path: Path) -> None:
    """The row cap stops the sheet's XML stream: a broken cell after it (a shared string that does not exist) is
    never reached."""
    rows = [row(1, "campaign", "row_id", "subject", "channels")]
    rows += [row(n, "c", f"r{n}", "a cat", "story") for n in range(2, 5_000)]
    rows += [row(5_000, "c", "last", ("s", 99), "story")]
    p = write_xlsx(tmp_path / "many.xlsx", sheet(rows), shared_strings(["unused"]))
    assert refused(p, max_rows=100) == [f"{p}:102: the brief has more than 100 rows (setting brief_max_rows); "
                                        "reading stopped here"]
    [problem] = refused(p, max_rows=100_000)
    assert problem.startswith(f"{p}: cannot read file: not a readable .xlsx workbook (")
    assert "shared string '99' does not exist" in problem


def test_cells_cap_counts_every_row_to_its_last_cell(tmp_path: Path) -> None:
    p = write(tmp_path, f"{HEADER},message\n" + "".join(f"c,r{i},a cat,story,hi\n" for i in range(10)))
    assert refused(p, max_cells=22) == [f"{p}:5: the brief has more than 22 cells (setting brief_max_cells); "
                                        "reading stopped here"]
    far = write_xlsx(tmp_path / "far.xlsx", sheet([row(1, "campaign", "row_id", "subject", "channels"),
                                                    '<row r="2"><c r="XFD2" t="inlineStr"><is><t>x</t></is></c></row>']))
    assert refused(far, max_cells=1000) == [f"{far}:2: the brief has more than 1000 cells (setting brief_max_cells); "
                                            "reading stopped here"]


def test_long_csv_cell_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, f"{HEADER}\nc,r1,{'x' * 101},story\n")
    assert refused(p, max_cell_chars=100) == [f"{p}:2: column 'subject': cell is longer than 100 characters "
                                              "(setting brief_max_cell_chars)"]
    # Past the csv module's own field limit (131072): the same refusal, from the line where the cell starts.
    huge = write(tmp_path, f"{HEADER}\nc,r1,a cat,story\nc,r2,\"{'y' * 200_000}\",story\n", name="huge.csv")
    assert refused(huge) == [f"{huge}:3: cell is longer than 10000 characters (setting brief_max_cell_chars)"]


def test_long_xlsx_cells_are_refused_as_they_stream_in(tmp_path: Path) -> None:
    """A 2 MB shared string and a 2 MB inline string (the 300 MB cell, small): refused with sheet, cell, line and
    column, counted chunk by chunk and never joined into one string."""
    big = (b"z" * 65536 for _ in range(32))
    p = write_xlsx(tmp_path / "shared.xlsx", sheet([row(1, "campaign", "row_id", "subject", "channels"),
                                                    row(2, "c", "r1", ("s", 1), "story")]),
                   shared_strings(["fine", big]))
    assert refused(p) == [f"{p}:2: column 'subject': sheet 'Brief' cell C2: cell is longer than 10000 characters "
                          "(setting brief_max_cell_chars)"]
    inline = write_xlsx(tmp_path / "inline.xlsx", sheet([row(1, "campaign", "row_id", "subject", "channels"),
                                                         row(3, "c", "r1", "a cat", "q" * 2_000_000)]))
    assert refused(inline) == [f"{inline}:3: column 'channels': sheet 'Brief' cell D3: cell is longer than 10000 "
                               "characters (setting brief_max_cell_chars)"]


def test_xlsx_unpacked_size_is_refused_from_the_zip_directory(tmp_path: Path) -> None:
    """A small file that unpacks to 3 MB (the 310 KB / 300 MB zip bomb, small): refused before any part is read."""
    p = write_xlsx(tmp_path / "bomb.xlsx", sheet([row(1, "campaign", "row_id", "subject", "channels")]),
                   shared_strings([(b"a" * 65536 for _ in range(48))]))
    assert p.stat().st_size < 20_000
    [problem] = refused(p, max_xlsx_bytes=2**20)
    assert problem.startswith(f"{p}: cannot read file: the workbook unpacks to ")
    assert problem.endswith("more than the 1048576 allowed (setting brief_max_xlsx_bytes)")
    assert "'xl/sharedStrings.xml' alone 3145" in problem


def test_xlsx_with_a_dtd_is_refused(tmp_path: Path) -> None:
    """Entity expansion ("billion laughs") needs a DTD; no part of an .xlsx has one."""
    bomb = ('<?xml version="1.0"?><!DOCTYPE w [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
            '<row r="1"><c r="A1" t="inlineStr"><is><t>&b;</t></is></c></row></sheetData></worksheet>')
    p = write_xlsx(tmp_path / "dtd.xlsx", bomb)
    [problem] = refused(p)
    assert problem == f"{p}: cannot read file: not a readable .xlsx workbook (an XML part declares a DTD)"


# ------------------------------------------------------------------------------------------------ variants and seeds


def test_a_billion_variants_is_a_row_problem_found_before_planning(tmp_path: Path) -> None:
    p = write(tmp_path, f"{HEADER},variants\nc,r1,a cat,story,1000000000\nc,r2,a dog,story,1000\n")
    brief = read_brief(p)
    assert [str(x) for x in brief.problems] == [
        f"{p}:2: column 'variants': '1000000000' is more than 1000 images per channel "
        "(setting brief_max_variants_per_row)"]
    assert [(r.row_id, r.variants) for r in brief.rows] == [("r2", 1000)]


def test_images_per_brief_cap_counts_variants_times_channels(tmp_path: Path) -> None:
    rows = "".join(f"c,r{i},a cat,\"story, banner\",600\n" for i in range(5))
    p = write(tmp_path, f"{HEADER},variants\n{rows}")
    assert refused(p, max_variants_per_brief=2000) == [
        f"{p}:3: column 'variants': the brief asks for more than 2000 images by this row (each row's variants x "
        "its channels; setting brief_max_variants_per_brief)"]
    assert len(read_brief(p, limits=BriefLimits(max_variants_per_brief=6000)).rows) == 5


def test_cells_of_5000_digits_are_one_line_problems(tmp_path: Path) -> None:
    """int() refuses strings of more than 4300 digits (ValueError); such a cell is a problem like any bad number."""
    digits = "9" * 5000
    p = write(tmp_path, f"{HEADER},variants,seed\nc,r1,a cat,story,{digits},\nc,r2,a cat,story,2,{digits}\n"
                        f"c,r3,a cat,story,-{digits},\n")
    shown = f"'{'9' * 60}...' (5000 characters)"
    assert [str(x) for x in read_brief(p).problems] == [
        f"{p}:2: column 'variants': {shown} is more than 1000 images per channel (setting brief_max_variants_per_row)",
        f"{p}:3: column 'seed': {shown} is too large (must be below 2**63)",
        f"{p}:4: column 'variants': '-{'9' * 59}...' (5001 characters) must be at least 1",
    ]


def test_seed_plus_variants_must_stay_within_int64(tmp_path: Path) -> None:
    """Image i uses seed + i: the last seed of a row must not pass 2**63 - 1 (it used to wrap to 0, 1, 2)."""
    top = 2**63 - 1
    p = write(tmp_path, f"{HEADER},variants,seed\nc,r1,a cat,story,4,{top - 3}\nc,r2,a cat,story,4,{top - 2}\n"
                        f"c,r3,a cat,story,,{top}\n")
    brief = read_brief(p)
    assert [(r.row_id, r.seed) for r in brief.rows] == [("r1", top - 3)]
    assert [str(x) for x in brief.problems] == [
        f"{p}:3: column 'seed': '{top - 2}' is too large for 4 variants: image i uses seed + i, and the last must "
        f"stay within 2**63 - 1 (use a seed of at most {top - 3})",
        f"{p}:4: column 'seed': '{top}' is too large for 4 variants: image i uses seed + i, and the last must "
        f"stay within 2**63 - 1 (use a seed of at most {top - 3})",
    ]


# ------------------------------------------------------------------------------------------------ database column lengths


def test_values_longer_than_their_database_columns_are_row_problems(tmp_path: Path) -> None:
    """PostgreSQL refuses a 256-character row_id (DataError mid-run), SQLite takes it: refused at validation."""
    assert {k: n for k, (_, n) in COLUMN_LENGTHS.items()} == {"campaign": 255, "row_id": 255, "channels": 64}
    long_id, long_campaign, long_channel = "r" * 256, "c" * 256, "x" * 65
    p = write(tmp_path, f"{HEADER}\nc,{'r' * 255},a cat,{'s' * 64}\nc,{long_id},a cat,story\n"
                        f"{long_campaign},r3,a cat,story\nc,r4,a cat,\"story, {long_channel}\"\n")
    brief = read_brief(p)
    assert [r.line for r in brief.rows] == [2]
    assert [str(x) for x in brief.problems] == [
        f"{p}:3: column 'row_id': '{'r' * 40}...' (256 characters) is longer than the 255 characters the database "
        "keeps (brief_rows.row_key)",
        f"{p}:4: column 'campaign': '{'c' * 40}...' (256 characters) is longer than the 255 characters the database "
        "keeps (campaigns.name)",
        f"{p}:5: column 'channels': channel name '{'x' * 40}...' (65 characters) is longer than the 64 characters "
        "the database keeps (variants.channel)",
    ]


# ------------------------------------------------------------------------------------------------ settings


def test_limits_come_from_settings(tmp_path: Path) -> None:
    from flows.settings import load_settings

    (tmp_path / "adforge.toml").write_text("brief_max_rows = 3\nbrief_max_cell_chars = 50\n")
    limits = BriefLimits.from_settings(load_settings(env={}, cwd=tmp_path))
    assert limits == BriefLimits(max_rows=3, max_cell_chars=50)


def test_long_row_id_never_reaches_the_database_on_any_backend(tmp_path: Path, db_url: str, campaign_model: Path,
                                                               campaign_caches) -> None:
    """PostgreSQL raised DataError on a 256-character row_id and left the run 'running' (even with --strict):
    now the row is refused at validation on both backends, the other rows render and the run completes."""
    from sqlalchemy import select

    from flows.campaign import campaign_run
    from storage.database import open_database
    from storage.schema import BriefRowRecord, Run

    p = write(tmp_path, f"{HEADER},variants\nc,{'r' * 256},a cat,instagram_square,1\nc,ok,a dog,instagram_square,1\n")
    overrides = {"db_url": db_url, "store_url": str(tmp_path / "assets"), "model": str(campaign_model), "steps": 1}
    with pytest.raises(BriefError) as info:
        campaign_run(str(p), strict=True, overrides=overrides)
    assert [x.column for x in info.value.problems] == ["row_id"]
    summary = campaign_run(str(p), overrides=overrides)
    assert summary["status"] == "completed" and summary["counts"]["rendered"] == 1
    assert summary["problems"] == [f"{p}:2: column 'row_id': '{'r' * 40}...' (256 characters) is longer than the 255 "
                                   "characters the database keeps (brief_rows.row_key)"]
    db = open_database(db_url)
    with db.session() as s:
        assert list(s.scalars(select(Run.status))) == ["completed"]
        assert list(s.scalars(select(BriefRowRecord.row_key))) == ["ok"]
    db.dispose()

"""Abusive briefs at the issue's full sizes (issue 28), each fed to the code a run uses (read_brief, then planning;
the inbox's reader; ``adforge plan``). Run by bench/abuse.py, which prints seconds and peak RSS per probe:

    .venv/bin/python bench/abuse.py brief
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from flows.brief import BriefError, read_brief
from tests.flows.xlsx_parts import shared_strings, sheet, write_xlsx

HEADER = "campaign,row_id,subject,channels,variants,seed,model\n"


def _outcome(path: Path, **kw: object) -> str:
    """The first problem read_brief reports (or how many rows it kept), then what planning says of the rest."""
    try:
        brief = read_brief(path, **kw)
    except BriefError as exc:
        return f"refused: {exc.problems[0]}"
    if brief.problems:
        return f"row refused: {brief.problems[0]}"
    if brief.warnings:
        return f"warning: {brief.warnings[0]}"
    return f"accepted: {len(brief.rows)} rows ({brief.encoding or 'xlsx'})"


def _csv(scratch: Path, rows: str, name: str = "brief.csv") -> Path:
    p = scratch / name
    p.write_text(HEADER + rows, encoding="utf-8")
    return p


def variants_1e9(scratch: Path) -> str:
    """`variants` 1000000000 grew past 1.3 GB in 25 s."""
    return _outcome(_csv(scratch, "c,r1,a cat,story,1000000000,,\n"))


def _big_text(n: int, chunk: int = 2**20) -> Iterator[bytes]:
    block = b"a" * chunk
    for _ in range(n // chunk):
        yield block


def xlsx_300mb_cell(scratch: Path) -> str:
    """An .xlsx of ~310 KB holding a 300 MB cell was accepted (89 s, 4.5 GB)."""
    p = write_xlsx(scratch / "cell.xlsx", sheet(['<row r="1"><c r="A1" t="s"><v>0</v></c></row>']),
                   shared_strings([_big_text(300 * 2**20)]))
    return f"{p.stat().st_size // 1024} KB file: " + _outcome(p)


def xlsx_50mb_cell_under_unpack_cap(scratch: Path) -> str:
    """A 50 MB inline cell, under the 64 MiB unpacked cap: refused by the streaming cell-length check."""
    rows = ['<row r="1"><c r="A1" t="inlineStr"><is><t>campaign</t></is></c></row><row r="2"><c r="A2" t="inlineStr"><is><t>']
    body = (r.encode() for r in rows)
    part = (*body, *_big_text(50 * 2**20), b"</t></is></c></row>")
    p = write_xlsx(scratch / "cell50.xlsx", _wrap(part))
    return f"{p.stat().st_size // 1024} KB file: " + _outcome(p)


def _wrap(inner: Iterator[bytes] | tuple[bytes, ...]) -> Iterator[bytes]:
    head, *_, tail = list(sheet([]))
    yield head
    yield from inner
    yield tail


def _rows_xml(n: int) -> Iterator[bytes]:
    """A header and ``n`` short rows of shared strings (cells without references: the compact form)."""
    yield b'<row r="1"><c t="s"><v>0</v></c><c t="s"><v>1</v></c><c t="s"><v>2</v></c><c t="s"><v>3</v></c></row>'
    batch = []
    for i in range(2, n + 2):
        batch.append(f'<row r="{i}"><c t="s"><v>4</v></c><c><v>{i}</v></c><c t="s"><v>5</v></c><c t="s"><v>6</v></c></row>')
        if len(batch) == 10_000:
            yield "".join(batch).encode()
            batch = []
    yield "".join(batch).encode()


_STRINGS = ["campaign", "row_id", "subject", "channels", "c", "a cat", "story"]


def xlsx_2m_rows(scratch: Path) -> str:
    """A ~10 MB .xlsx with 2M rows ran past 4 minutes at 4.7 GB."""
    p = write_xlsx(scratch / "rows.xlsx", _wrap(_rows_xml(2_000_000)), shared_strings(_STRINGS))
    return f"{p.stat().st_size // 2**20} MB file: " + _outcome(p)


def xlsx_200k_rows_under_unpack_cap(scratch: Path) -> str:
    """200k short rows that unpack under 64 MiB: the row cap stops the stream at row 10,001."""
    p = write_xlsx(scratch / "rows.xlsx", _wrap(_rows_xml(200_000)), shared_strings(_STRINGS))
    return f"{p.stat().st_size // 2**20} MB file: " + _outcome(p)


def xlsx_billion_laughs(scratch: Path) -> str:
    entities = "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 10))
    bomb = (f'<?xml version="1.0"?><!DOCTYPE w [<!ENTITY e0 "lol">{entities}]>'
            '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
            '<row r="1"><c r="A1" t="inlineStr"><is><t>&e9;</t></is></c></row></sheetData></worksheet>')
    return _outcome(write_xlsx(scratch / "laughs.xlsx", bomb))


def csv_2m_rows(scratch: Path) -> str:
    p = scratch / "rows.csv"
    with open(p, "w", encoding="utf-8") as f:
        f.write(HEADER)
        for start in range(0, 2_000_000, 50_000):
            f.write("".join(f"c,r{i},a cat,story,1,,\n" for i in range(start, start + 50_000)))
    return f"{p.stat().st_size // 2**20} MB file: " + _outcome(p)


def csv_600k_rows_under_size_cap(scratch: Path) -> str:
    p = scratch / "rows.csv"
    with open(p, "w", encoding="utf-8") as f:
        f.write(HEADER)
        for start in range(0, 600_000, 50_000):
            f.write("".join(f"c,r{i},a cat,story,1,,\n" for i in range(start, start + 50_000)))
    return f"{p.stat().st_size // 2**20} MB file: " + _outcome(p)


def csv_5_gb_sparse(scratch: Path) -> str:
    p = scratch / "huge.csv"
    with open(p, "wb") as f:
        f.truncate(5 * 2**30)
    return _outcome(p)


def seed_5000_digits(scratch: Path) -> str:
    return _outcome(_csv(scratch, f"c,r1,a cat,story,2,{'9' * 5000},\n"))


def variants_5000_digits(scratch: Path) -> str:
    return _outcome(_csv(scratch, f"c,r1,a cat,story,{'9' * 5000},,\n"))


def seed_wraps_past_int64(scratch: Path) -> str:
    return _outcome(_csv(scratch, f"c,r1,a cat,story,4,{2**63 - 2},\n"))


def row_id_300_chars(scratch: Path) -> str:
    """PostgreSQL raised DataError on a 256+ character row_id and left the run `running`."""
    return _outcome(_csv(scratch, f"c,{'r' * 300},a cat,story,1,,\n"))


def utf16_csv(scratch: Path) -> str:
    p = scratch / "utf16.csv"
    p.write_bytes(b"\xff\xfe" + (HEADER + "c,r1,a cat,story,1,,\n").encode("utf-16-le"))
    return _outcome(p)


def formula_without_saved_value(scratch: Path) -> str:
    import openpyxl

    p = scratch / "formula.xlsx"
    wb = openpyxl.Workbook()
    wb.active.append(HEADER.strip().split(","))
    wb.active.append(["c", "r1", "a cat", "story", "=2*2", None, None])
    wb.save(p)
    return _outcome(p)


def _plan(scratch: Path, rows: str) -> str:
    """``adforge plan`` as typed, in the scratch folder (no adforge.toml), with the bundled model."""
    from typer.testing import CliRunner

    from cli.app import app

    brief = _csv(scratch, rows)
    os.chdir(scratch)
    result = CliRunner().invoke(app, ["plan", str(brief), "--details"])
    lines = [ln.strip() for ln in result.output.splitlines() if ln.strip()]
    raw = "\x1b" in result.output
    shown = [ln for ln in lines if "column 'model'" in ln] or lines[:1]
    return f"exit {result.exit_code}, raw ESC in output: {raw}; " + shown[0]


def ansi_in_plan(scratch: Path) -> str:
    return _plan(scratch, "c\x1b[2J\x1b[31m,r1\x1b[1A,a cat,instagram_square,1,,\n")


def model_path_probe(scratch: Path) -> str:
    """The `model` column told a brief author whether a file exists and its size ("only 3 bytes")."""
    (scratch / "three").write_bytes(b"abc")
    return _plan(scratch, f"c,r1,a cat,instagram_square,1,,{scratch / 'three'}\nc,r2,a cat,instagram_square,1,,\n")


def inbox_5_gb_file(scratch: Path) -> str:
    """The inbox read each file whole (path.read_bytes() / S3 get) before anything looked at it."""
    from flows.brief import BriefLimits
    from flows.inbox import _read_entry, _TooBig, list_inbox

    with open(scratch / "huge.csv", "wb") as f:
        f.truncate(5 * 2**30)
    store, [entry] = list_inbox(str(scratch))
    try:
        _read_entry(store, entry, BriefLimits().max_bytes)
    except _TooBig as exc:
        return f"rejected before reading: {exc.size} bytes"
    return "read in full"


PROBES: dict[str, Callable[[Path], str]] = {f"brief_{f.__name__}": f for f in (
    variants_1e9, xlsx_300mb_cell, xlsx_50mb_cell_under_unpack_cap, xlsx_2m_rows, xlsx_200k_rows_under_unpack_cap,
    xlsx_billion_laughs, csv_2m_rows, csv_600k_rows_under_size_cap, csv_5_gb_sparse, seed_5000_digits, variants_5000_digits,
    seed_wraps_past_int64, row_id_300_chars, utf16_csv, formula_without_saved_value, ansi_in_plan, model_path_probe,
    inbox_5_gb_file,
)}

"""Hand-made .xlsx files for the brief reader's tests and abuse probes: the XML parts written as given, so a test
can hold what openpyxl cannot write (a formula with its saved result, a formula without one, a cell of megabytes,
millions of rows) and a part can be streamed into the zip (a 300 MB cell costs no memory to make)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import escape

MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
DOC = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"

Part = str | bytes | Iterable[bytes]


def cell(ref: str, value: object) -> str:
    """One ``<c>``: a str is an inline string, an int or float a number, ``("=", formula, saved)`` a formula with
    its saved result (None: saved without one), ``("s", index)`` a shared string."""
    if isinstance(value, tuple) and value[0] == "=":
        _, formula, saved = value
        kind = ' t="str"' if isinstance(saved, str) else ""
        saved_xml = "" if saved is None else f"<v>{escape(str(saved))}</v>"
        return f'<c r="{ref}"{kind}><f>{escape(formula)}</f>{saved_xml}</c>'
    if isinstance(value, tuple) and value[0] == "s":
        return f'<c r="{ref}" t="s"><v>{value[1]}</v></c>'
    if isinstance(value, (int, float)):
        return f'<c r="{ref}"><v>{value}</v></c>'
    return f'<c r="{ref}" t="inlineStr"><is><t>{escape(str(value))}</t></is></c>'


def row(n: int, *values: object) -> str:
    cells = "".join(cell(f"{chr(65 + i)}{n}", v) for i, v in enumerate(values) if v is not None)
    return f'<row r="{n}">{cells}</row>'


def sheet(rows: Iterable[str]) -> Iterable[bytes]:
    yield f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{MAIN}"><sheetData>'.encode()
    for r in rows:
        yield r.encode()
    yield b"</sheetData></worksheet>"


def shared_strings(strings: Iterable[str | Iterable[bytes]]) -> Iterable[bytes]:
    yield f'<?xml version="1.0" encoding="UTF-8"?><sst xmlns="{MAIN}">'.encode()
    for s in strings:
        yield b"<si><t>"
        if isinstance(s, str):
            yield escape(s).encode()
        else:
            yield from s
        yield b"</t></si>"
    yield b"</sst>"


def write_xlsx(path: Path, sheet_part: Part, strings_part: Part | None = None, sheet_name: str = "Brief") -> Path:
    """A workbook of one worksheet (``sheet_part``, e.g. :func:`sheet`) and optional shared strings."""
    strings_rel = (f'<Relationship Id="rId2" Type="{DOC}/sharedStrings" Target="sharedStrings.xml"/>'
                   if strings_part is not None else "")
    parts: dict[str, Part] = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            + ('<Override PartName="/xl/sharedStrings.xml" '
               'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/>'
               if strings_part is not None else "")
            + "</Types>"),
        "_rels/.rels": (f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{RELS}">'
                        f'<Relationship Id="rId1" Type="{DOC}/officeDocument" Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{MAIN}" xmlns:r="{DOC}"><sheets>'
                            f'<sheet name="{escape(sheet_name)}" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{RELS}">'
            f'<Relationship Id="rId1" Type="{DOC}/worksheet" Target="worksheets/sheet1.xml"/>{strings_rel}</Relationships>'),
        "xl/worksheets/sheet1.xml": sheet_part,
    }
    if strings_part is not None:
        parts["xl/sharedStrings.xml"] = strings_part
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, part in parts.items():
            with zf.open(name, "w", force_zip64=True) as out:
                if isinstance(part, str):
                    out.write(part.encode())
                elif isinstance(part, bytes):
                    out.write(part)
                else:
                    for chunk in part:
                        out.write(chunk)
    return path

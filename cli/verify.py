"""``adforge verify FILE...``: where a picture came from, from what it carries and what the database holds.

Per file: the invisible watermark (an adforge asset identifier, or this installation's ``text:`` payload), other
tools' known watermarks (Stable Diffusion v1's reference scripts, SDXL), the infotext, the XMP digital source
type, the C2PA manifest (validated against c2pa's trust list and ``c2pa_trust``),
and the asset row found by the watermark or by the file's sha256. Exit code 0 when every file had at least one
finding (an invalid C2PA manifest counts, as ``c2pa-invalid``), 1 when one had none, 2 for a missing file or one
that is not an image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from cli.errors import fail
from cli.options import ConfigOpt, DbOpt, load_settings

__all__ = ["app", "verify"]

app = typer.Typer()


def _database(url: str):
    """The database to look assets up in, or None (with the reason) when there is none: verify never creates one."""
    from sqlalchemy.engine import make_url

    from storage.database import open_database, shown_url

    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
            return None, f"no database at {shown_url(url)}"
        return open_database(url), None  # upgraded as every command does: an older one lacks assets.watermark
    except Exception as exc:  # an unreachable server: the other findings still count
        return None, f"database {shown_url(url)} not readable ({type(exc).__name__})"


def _channel_sizes() -> list[tuple[int, int]]:
    """The channels' output sizes, where a resized copy may be read back at its delivered size."""
    from flows.channels import load_channels

    try:
        return sorted({(c.width, c.height) for c in load_channels().values()})
    except Exception:  # no readable channel list here: the other readings still run
        return []


def _verify_one(path: Path, data: bytes, custom: bytes | None, trust_pem: str | None, db) -> dict[str, Any]:
    from PIL import Image

    from storage.provenance import (find_asset, image_format, read_c2pa, read_foreign_marks, read_metadata,
                                    read_watermark, sha256_of)

    picture = Image.open(io.BytesIO(data))  # UnidentifiedImageError: not an image at all
    fmt, size = image_format(picture), list(picture.size)
    digest = sha256_of(data)
    try:
        picture.load()
        mark, damaged = read_watermark(picture, custom, _channel_sizes()), False
        foreign = read_foreign_marks(picture)
    except (OSError, ValueError, SyntaxError):  # pixels that do not decode (a damaged or tampered file)
        mark, foreign, damaged = None, [], True
    meta = read_metadata(data)
    try:
        c2pa = read_c2pa(data, fmt, trust_pem)
    except ImportError:  # c2pa-python missing from this environment
        c2pa = None
    asset = None
    if db is not None:
        asset = find_asset(db, watermarks=mark["candidates"] if mark else [], sha256=digest)
    # An invalid manifest is still a finding (the file claims an origin and was changed since): named apart.
    c2pa_name = "c2pa" if c2pa is None or c2pa.get("valid") else "c2pa-invalid"
    findings = [name for name, hit in (("watermark", mark and mark["found"]), ("foreign-watermark", foreign),
                                       ("infotext", meta["infotext"]),
                                       ("xmp", meta["digital_source_type"]), (c2pa_name, c2pa), ("database", asset))
                if hit]
    return {"file": str(path), "format": fmt, "size": size, "damaged": damaged, "sha256": digest,
            "watermark": mark, "foreign_watermarks": foreign, "infotext": meta["infotext"],
            "digital_source_type": meta["digital_source_type"],
            "variant_identity": meta["variant_identity"], "c2pa": c2pa, "asset": asset, "findings": findings}


def _show(out: Console, r: dict[str, Any], db_note: str | None) -> None:
    head = "[green]found[/green] " + ", ".join(r["findings"]) if r["findings"] else "[red]nothing found[/red]"
    out.print(f"[bold]{escape(r['file'])}[/bold]  {r['format'] or '?'} {r['size'][0]}x{r['size'][1]}  {head}",
              soft_wrap=True)
    mark = r["watermark"]
    if r["damaged"]:
        line = "not read: the pixels do not decode (a damaged or altered file)"
    elif mark is None:
        line = "too small to carry one"
    elif mark["kind"] == "adforge":
        read_how = "" if mark["read"] == "as it is" else f", {mark['read']}"
        line = f"adforge asset id {mark['payload']} (confidence {mark['confidence']:.2f}{read_how})"
    elif mark["kind"] == "custom":
        line = f"custom payload {mark['text']!r} ({mark['payload']}, confidence {mark['confidence']:.2f})"
    else:
        line = f"none (best reading {mark['payload']}, confidence {mark['confidence']:.2f} < {mark['threshold']})"
    out.print(f"  watermark   {escape(line)}", soft_wrap=True)
    for other in r["foreign_watermarks"]:
        out.print(f"  other mark  {escape(other['name'])} ({other['bit_accuracy']:.0%} of its bits)", soft_wrap=True)
    info = r["infotext"]
    out.print(f"  infotext    {escape(info.splitlines()[-1]) if info else 'none'}", soft_wrap=True)
    out.print(f"  XMP         {escape(r['digital_source_type'] or 'none')}", soft_wrap=True)
    c2pa = r["c2pa"]
    if c2pa is None:
        out.print("  C2PA        none")
    else:
        verdict = c2pa.get("verdict") or ("valid" if c2pa.get("valid") else "INVALID")
        out.print(f"  C2PA        {escape(str(verdict))}; generator {escape(str(c2pa.get('generator')))}, "
                  f"signer {escape(str(c2pa.get('signer')))}", soft_wrap=True)
        for problem in c2pa.get("problems") or []:
            out.print(f"              {escape(str(problem))}", soft_wrap=True)
    a = r["asset"]
    if a is None:
        out.print(f"  database    {escape(db_note or 'no asset with this watermark or sha256')}", soft_wrap=True)
    else:
        flagged = "flagged" + (f", released by {a['released_by']}" if a["released_by"] else "") if a["flagged"] else "not flagged"
        out.print(f"  database    asset {a['asset_id']} (by {a['matched_by']}"
                  f"{', the delivered file unchanged' if a['identical_file'] else ''}): run {a['run_id']}, "
                  f"variant {a['variant_id']}, {escape(str(a['campaign']))} / {escape(a['channel'])}, seed {a['seed']}, "
                  f"model {escape(a['model'])}, {a['status']}, review {a['review']}, {flagged}", soft_wrap=True)
        out.print(f"              prompt {escape(a['prompt'])}", soft_wrap=True)


@app.command()
def verify(
    files: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP) to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (a list, one object per file).")] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Where pictures came from: invisible watermark, infotext, XMP, C2PA and the asset in the database."""
    settings = load_settings(config, db_url=db)
    from PIL import UnidentifiedImageError

    from storage.watermark_payload import custom_payload

    blobs: list[bytes] = []
    for path in files:
        try:
            blobs.append(path.read_bytes())
        except OSError as exc:
            raise fail(f"{path}: {exc.strerror or exc}", 2) from None
    custom = custom_payload(settings.watermark[5:]) if settings.watermark.startswith("text:") else None
    trust_pem = None
    if settings.c2pa_trust:
        try:
            trust_pem = Path(settings.c2pa_trust).read_text()
        except OSError as exc:
            raise fail(f"c2pa_trust {settings.c2pa_trust}: {exc.strerror or exc}", 2) from None
    database, db_note = _database(settings.db_url)
    reports = []
    try:
        for path, data in zip(files, blobs):
            try:
                reports.append(_verify_one(path, data, custom, trust_pem, database))
            except UnidentifiedImageError as exc:
                raise fail(f"{path}: not a readable image ({type(exc).__name__})", 2) from None
    finally:
        if database is not None:
            database.dispose()
    if as_json:
        typer.echo(json.dumps(reports, indent=2, default=str))
    else:
        out = Console(highlight=False)
        for r in reports:
            _show(out, r, db_note)
    if any(not r["findings"] for r in reports):
        raise typer.Exit(1)

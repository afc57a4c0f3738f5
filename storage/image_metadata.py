"""Metadata written into every image file: A1111 ``parameters`` infotext and an XMP "AI-generated" mark.

The infotext layout is what A1111 writes and what readers such as Civitai and sd-prompt-reader parse::

    {prompt}
    Negative prompt: {negative}
    Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: abcdef1234, Model: name

A value holding ``,``, ``:`` or a newline is JSON-quoted so the line still splits unambiguously, except ``Hashes``:
a JSON object of the model's and adapters' hashes that Civitai reads as written, unquoted.
The XMP packet carries IPTC ``DigitalSourceType = trainedAlgorithmicMedia``, the machine-readable mark that
EU AI Act Art. 50 asks for. Files lose both when re-encoded elsewhere; the database row stays the record.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image, PngImagePlugin

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_PNG_KEY = "XML:com.adobe.xmp"
NEGATIVE_PREFIX = "Negative prompt: "


RAW_JSON_KEYS = frozenset({"Hashes"})


def _is_json_object(value: str) -> bool:
    try:
        return value.startswith("{") and "\n" not in value and isinstance(json.loads(value), dict)
    except ValueError:
        return False


def _quote(value: str, key: str = "") -> str:
    if key in RAW_JSON_KEYS and _is_json_object(value):
        return value
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def format_infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, str]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE_PREFIX + negative_prompt)
    lines.append(", ".join(f"{k}: {_quote(str(v), k)}" for k, v in parameters.items()))
    return "\n".join(lines)


# One "Key: value" item of the last line; the value is a JSON string or runs to the next comma.
_ITEM = re.compile(r'\s*([\w \-/+.()]+):\s*("(?:\\.|[^\\"])*"|\{(?:"(?:\\.|[^\\"])*"|[^{}"])*\}|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of :func:`format_infotext`: (prompt, negative prompt, parameters)."""
    *head, last = text.split("\n")
    if not _ITEM.match(last) or "Steps:" not in last:
        head, last = [*head, last], ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in head:
        if line.startswith(NEGATIVE_PREFIX) and not negative_lines:
            negative_lines.append(line[len(NEGATIVE_PREFIX):])
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    params: dict[str, str] = {}
    for m in _ITEM.finditer(last):
        key, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"'):
            value = json.loads(value)
        params[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def xmp_packet(extra: Mapping[str, str] | None = None) -> str:
    """A minimal XMP packet marking the image as made by a trained algorithm (IPTC digital source type)."""
    extra_xml = "".join(f"\n    <adforge:{k}>{escape(v)}</adforge:{k}>" for k, v in (extra or {}).items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:adforge="https://adforge.invalid/ns/1.0/">\n'
        f"    <Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}</Iptc4xmpExt:DigitalSourceType>"
        f"{extra_xml}\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )


def encode_png(image: Image.Image, infotext: str, xmp: str | None = None, *, compress_level: int = 6) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)  # tEXt if Latin-1 fits, else iTXt (PIL decides)
    info.add_itxt(XMP_PNG_KEY, xmp or xmp_packet())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_png_metadata(path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """(infotext, xmp) as stored in a PNG, None where absent."""
    with Image.open(path) as im:
        text = getattr(im, "text", {})
        return text.get("parameters"), text.get(XMP_PNG_KEY)


# ------------------------------------------------------------------------------------------------ JPEG / WebP

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286  # where A1111 puts the infotext in JPEG / WebP files
_UNICODE_PREFIX = b"UNICODE\x00"
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def _exif_with_comment(infotext: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_PREFIX + infotext.encode("utf-16-be")
    return exif


def encode_image(image: Image.Image, fmt: str, infotext: str, xmp: str | None = None, *, quality: int = 92,
                 png_level: int = 6) -> bytes:
    """``image`` as ``png`` / ``jpeg`` / ``webp`` bytes carrying the infotext and the XMP packet.

    PNG: ``parameters`` text chunk + iTXt XMP, zlib level ``png_level`` (the same pixels at any level; 1 is several
    times faster and somewhat larger). JPEG and WebP: EXIF UserComment (UTF-16, as A1111 writes it) + the XMP packet
    (APP1 / XMP chunk)."""
    if fmt == "png":
        return encode_png(image, infotext, xmp, compress_level=png_level)
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r} (known: {', '.join(FORMATS)})")
    buf = io.BytesIO()
    image.convert("RGB").save(
        buf, format=FORMATS[fmt], quality=quality, exif=_exif_with_comment(infotext), xmp=(xmp or xmp_packet()).encode("utf-8")
    )
    return buf.getvalue()


def read_image_metadata(source: str | os.PathLike[str] | bytes) -> tuple[str | None, str | None]:
    """(infotext, xmp) from a PNG, JPEG or WebP file (path or bytes), None where absent."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(handle) as im:
        if im.format == "PNG":
            text = getattr(im, "text", {})
            return text.get("parameters"), text.get(XMP_PNG_KEY)
        raw_xmp = im.info.get("xmp")
        xmp = raw_xmp.decode("utf-8") if isinstance(raw_xmp, bytes) else raw_xmp
        comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        infotext = None
        if isinstance(comment, bytes) and comment.startswith(_UNICODE_PREFIX):
            infotext = comment[len(_UNICODE_PREFIX):].decode("utf-16-be")
        elif isinstance(comment, str):
            infotext = comment
        return infotext, xmp

"""The invisible watermark's payload: 64 bits, either an adforge asset identifier or a text of the user's own.

The ``watermark`` setting: ``on`` (default) marks each delivered file with its asset identifier, the magic byte
0xAF then the first 7 bytes of sha256 of the variant's identity (``assets.watermark`` holds it as hex, so
``adforge verify`` finds the asset from the pixels alone); ``off``; or ``text:XXXX``, up to 8 printable ASCII
characters of the user's own (a company id), zero-padded. No text can start with 0xAF, so the two never mix.
Kept apart from :mod:`storage.watermark` so that reading settings does not import OpenCV.
"""

from __future__ import annotations

import hashlib

__all__ = ["MAGIC", "PAYLOAD_BITS", "adforge_payload", "custom_payload", "payload_text", "watermark_setting"]

PAYLOAD_BITS = 64
MAGIC = 0xAF  # the first byte of every adforge asset identifier


def adforge_payload(identity: str) -> bytes:
    """The 8-byte adforge asset identifier: the magic byte, then the first 7 bytes of sha256(identity)."""
    return bytes([MAGIC]) + hashlib.sha256(identity.encode("utf-8")).digest()[:7]


def custom_payload(text: str) -> bytes:
    """A payload of the user's own (the ``watermark`` setting ``text:XXXX``): 1 to 8 printable ASCII characters,
    zero-padded to 8 bytes. ValueError naming the problem otherwise."""
    if not text:
        raise ValueError("'text:' needs 1 to 8 printable ASCII characters after it")
    if len(text) > PAYLOAD_BITS // 8 or not all(32 <= ord(c) < 127 for c in text):
        raise ValueError(f"'text:{text}': at most {PAYLOAD_BITS // 8} printable ASCII characters")
    return text.encode("ascii").ljust(PAYLOAD_BITS // 8, b"\0")


def watermark_setting(value: str) -> str:
    """The ``watermark`` setting in its canonical form ("on", "off" or "text:XXXX"); ValueError for anything else."""
    v = value.strip()
    if v.lower() in ("on", "off"):
        return v.lower()
    if v[:5].lower() == "text:":
        custom_payload(v[5:])
        return "text:" + v[5:]
    raise ValueError(f"expected on, off or text:XXXX (up to 8 ASCII characters), got {value!r}")


def payload_text(payload: bytes) -> str | None:
    """A custom payload as the text it was made from (None when it is not printable ASCII, zero-padded)."""
    text = payload.rstrip(b"\0")
    if text and all(32 <= b < 127 for b in text):
        return text.decode("ascii")
    return None

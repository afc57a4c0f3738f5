"""Serving full-size assets from either store without letting a URL reach outside it.

Assets are addressed by database id (``/assets/{id}``) or by their recorded storage key (``/files/{key}``); a key
is served only if it passes the stores' own key validation *and* is the key of a recorded asset, so ``..``,
absolute paths, backslashes and unrecorded files all answer 404.

S3 objects are not streamed through the gallery by default: the browser is redirected to a presigned GET URL
that expires after a few minutes (``s3_delivery="presign"``). ``"proxy"`` streams them instead, for buckets the
reviewers' browsers cannot reach.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import RedirectResponse, Response

from storage.assets import AssetStore, S3AssetStore, validate_key

__all__ = ["CONTENT_TYPES", "S3Delivery", "asset_response", "presigned_url", "safe_key"]

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
S3Delivery = Literal["presign", "proxy"]


def safe_key(key: str) -> str | None:
    """The key if the stores would accept it, else None (callers answer 404, never the validation message)."""
    try:
        return validate_key(key)
    except (ValueError, TypeError):
        return None


def presigned_url(store: S3AssetStore, key: str, seconds: int) -> str:
    full = (store.prefix + "/" if store.prefix else "") + validate_key(key)
    return store.client.generate_presigned_url(
        "get_object", Params={"Bucket": store.bucket, "Key": full}, ExpiresIn=seconds, HttpMethod="GET"
    )


def asset_response(store: AssetStore, key: str, fmt: str, *, s3_delivery: S3Delivery = "presign",
                   presign_seconds: int = 300) -> Response:
    """The full-size file: a presigned redirect for S3 (unless proxying), the bytes otherwise. Raises KeyError
    when the store has no such object."""
    if isinstance(store, S3AssetStore) and s3_delivery == "presign":
        if not store.exists(key):
            raise KeyError(key)
        # The presigned URL is a short-lived credential: browsers and proxies must not keep the redirect.
        return RedirectResponse(presigned_url(store, key, presign_seconds), status_code=307,
                                headers={"Cache-Control": "no-store"})
    data = store.get(key)
    return Response(content=data, media_type=CONTENT_TYPES.get(fmt.lower(), "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=3600"})

"""Asset stores: where generated image bytes live (a local folder or an S3 bucket).

Both stores share one contract (:class:`AssetStore`):

* keys are relative POSIX paths (``campaign/row/channel/v03-s12345.png``), validated the same way in both
  stores so a key that works locally works in S3 and the reverse;
* ``put`` is atomic (readers never see a partial object) and idempotent (same key, same bytes: no write,
  same :class:`StoredAsset`);
* ``get`` raises ``KeyError(key)`` for a missing key; ``delete`` of a missing key is a no-op.

:func:`open_store` turns a configuration URL into a store and :func:`asset_key` builds deterministic,
filesystem- and URL-safe keys from a variant's identity.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit
from urllib.request import url2pathname

from storage.image_metadata import write_atomic

__all__ = [
    "AssetStore",
    "LocalAssetStore",
    "S3AssetStore",
    "StoredAsset",
    "asset_key",
    "open_store",
    "validate_key",
]


@dataclass(frozen=True)
class StoredAsset:
    key: str  # the store-relative key, as passed to put/get
    url: str  # where the object lives: file:///abs/path or s3://bucket/prefix/key
    size: int
    sha256: str  # hex digest of the bytes


@runtime_checkable
class AssetStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str) -> StoredAsset: ...

    def get(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...


# --------------------------------------------------------------------------------------------------- keys

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_temp_name(name: str) -> bool:
    # write_atomic's temporary files: ".{name}.XXXXXXXX.part" next to the target.
    return name.startswith(".") and name.endswith(".part")


def _sweep_temporaries(path: Path) -> None:
    """Remove what killed writers of ``path`` left: their ".{name}.XXXXXXXX.part" files beside it. Only the run that
    holds a variant's claim writes its keys, so no live writer of the same key is racing this one; if one were, its
    rename would fail and its put be retried, losing nothing."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        try:
            stale.unlink(missing_ok=True)
        except OSError:
            pass  # a folder of the same name, or no permission: left for whoever can


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative POSIX path, else raise ``ValueError`` naming it."""

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid asset key {key!r}: {reason}")

    if not isinstance(key, str):
        raise bad("must be a str")
    if not key:
        raise bad("empty")
    if "\\" in key:
        raise bad("backslashes are not allowed; use '/'")
    if _CONTROL.search(key):
        raise bad("control characters are not allowed")
    if key.startswith("/"):
        raise bad("absolute paths are not allowed")
    for segment in key.split("/"):
        if segment == "":
            raise bad("empty path segments ('//' or a trailing '/') are not allowed")
        if segment in (".", ".."):
            raise bad("'.' and '..' segments are not allowed")
        if _is_temp_name(segment):
            raise bad("names like '.*.part' are reserved for temporary files")
    return key


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_bytes(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"asset data must be bytes, not {type(data).__name__}")
    return bytes(data)


# -------------------------------------------------------------------------------------------------- local


class LocalAssetStore:
    """Assets as files under ``root``; writes go through :func:`write_atomic` (temp file + rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalAssetStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = self.root.joinpath(*key.split("/"))
        # A symlink inside the root must not lead writes or reads outside it.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"invalid asset key {key!r}: resolves outside the store root {str(self.root)!r}")
        return path

    def _asset(self, key: str, path: Path, size: int, digest: str) -> StoredAsset:
        return StoredAsset(key=key, url=path.as_uri(), size=size, sha256=digest)

    def put(self, key: str, data: bytes, content_type: str) -> StoredAsset:
        data = _check_bytes(data)
        path = self._path(key)
        digest = _sha256(data)
        try:
            if path.is_file() and path.stat().st_size == len(data) and _sha256(path.read_bytes()) == digest:
                _sweep_temporaries(path)
                return self._asset(key, path, len(data), digest)  # same bytes already there: no write
        except OSError:
            pass  # unreadable or vanished: just write it
        write_atomic(path, data)
        _sweep_temporaries(path)
        return self._asset(key, path, len(data), digest)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, at most ``max_bytes + 1`` of them (a caller capping what it reads
        sees that it was over without holding all of it)."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read() if max_bytes is None else f.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            # Prune folders that cannot hold a key starting with the prefix.
            dirnames[:] = sorted(
                d for d in dirnames if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            )
            keys.extend(base + f for f in filenames if not _is_temp_name(f) and (base + f).startswith(prefix))
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # Tidy now-empty folders up to (not including) the root.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


# ----------------------------------------------------------------------------------------------------- S3

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3AssetStore:
    """Assets as S3 objects under ``s3://bucket/prefix/``.

    ``put_object`` is atomic in S3 (an object appears whole or not at all). The sha256 hex digest is stored
    as object metadata (``x-amz-meta-sha256``). Transient errors (throttling, 5xx, connection errors) are
    retried with botocore's ``standard`` retry mode, ``max_attempts`` attempts in all. Credentials come from
    the usual AWS chain (environment, config files, instance roles) unless a ready ``client`` is given.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        max_attempts: int = 5,
        region_name: str | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except ValueError as e:
                raise ValueError(f"invalid S3 prefix {prefix!r}: {e}") from None
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self._base = prefix + "/" if prefix else ""
        url = f"s3://{bucket}/{quote(prefix)}" if prefix else f"s3://{bucket}"
        if endpoint_url:
            url += "?" + urlencode({"endpoint_url": endpoint_url})
        self.url = url
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "total_max_attempts": max_attempts},  # attempts in all, the first included
                # S3-compatible services (MinIO, Ceph, moto) generally want path-style addressing.
                s3={"addressing_style": "path"} if endpoint_url else None,
                connect_timeout=10,
                read_timeout=60,
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region_name, config=config
            )
        self.client = client

    def __repr__(self) -> str:
        return f"S3AssetStore({self.url!r})"

    def _full(self, key: str) -> str:
        return self._base + validate_key(key)

    def _asset(self, key: str, size: int, digest: str) -> StoredAsset:
        return StoredAsset(key=key, url=f"s3://{self.bucket}/{self._base}{key}", size=size, sha256=digest)

    @staticmethod
    def _is_missing(error: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(error, ClientError) and str(error.response.get("Error", {}).get("Code")) in _MISSING_CODES

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as e:
            if self._is_missing(e):
                return None
            raise

    def put(self, key: str, data: bytes, content_type: str) -> StoredAsset:
        data = _check_bytes(data)
        full = self._full(key)
        digest = _sha256(data)
        head = self._head(key)
        if (
            head is not None
            and head.get("ContentLength") == len(data)
            and head.get("Metadata", {}).get("sha256") == digest
            and head.get("ContentType") == content_type
        ):
            return self._asset(key, len(data), digest)  # same bytes already there: no write
        self.client.put_object(
            Bucket=self.bucket, Key=full, Body=data, ContentType=content_type, Metadata={"sha256": digest}
        )
        return self._asset(key, len(data), digest)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, at most ``max_bytes + 1`` of them, read from the stream."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as e:
            if self._is_missing(e):
                raise KeyError(key) from None
            raise
        with response["Body"] as body:
            return body.read() if max_bytes is None else body.read(max_bytes + 1)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base + prefix):
            keys.extend(obj["Key"][len(self._base):] for obj in page.get("Contents", ()))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))


# ------------------------------------------------------------------------------------------------ opening


def open_store(url: str) -> AssetStore:
    """A store from a URL: ``file:///abs/path``, a plain path, or ``s3://bucket/prefix[?endpoint_url=...]``.

    S3 query parameters: ``endpoint_url`` (an S3-compatible service), ``max_attempts``, ``region``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty asset store URL {url!r}")
    if "://" not in url:
        return LocalAssetStore(Path(url))  # a plain path, relative ones taken from the working folder
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} names a remote host {parts.netloc!r}; only local paths are supported")
        if parts.query or parts.fragment:
            raise ValueError(f"file URL {url!r} must not have a query or fragment")
        if not parts.path:
            raise ValueError(f"file URL {url!r} has no path")
        return LocalAssetStore(Path(url2pathname(parts.path)))
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"S3 URL {url!r} has no bucket (expected s3://bucket/prefix)")
        if parts.fragment:
            raise ValueError(f"S3 URL {url!r} must not have a fragment")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = set(query) - {"endpoint_url", "max_attempts", "region"}
        if unknown:
            raise ValueError(
                f"S3 URL {url!r}: unknown parameter(s) {sorted(unknown)}; known: endpoint_url, max_attempts, region"
            )
        one = {name: values[-1] for name, values in query.items()}
        kwargs: dict[str, Any] = {}
        if one.get("endpoint_url"):
            kwargs["endpoint_url"] = one["endpoint_url"]
        if one.get("region"):
            kwargs["region_name"] = one["region"]
        if "max_attempts" in one:
            try:
                kwargs["max_attempts"] = int(one["max_attempts"])
            except ValueError:
                raise ValueError(f"S3 URL {url!r}: max_attempts must be an integer") from None
        return S3AssetStore(parts.netloc, unquote(parts.path).strip("/"), **kwargs)
    raise ValueError(
        f"unsupported asset store URL {url!r}: scheme {parts.scheme!r} (use file:///path, a plain path, or s3://bucket/prefix)"
    )


# ------------------------------------------------------------------------------------------------ key names

_UNSAFE = re.compile(r"[^a-z0-9._-]+")
_MAX_SLUG = 80
_EXT = re.compile(r"[a-z0-9]{1,10}")


def _slug(part: str, what: str) -> str:
    """Lower-case ``[a-z0-9._-]``; if that changed the text, a short hash of the original is appended."""
    if not isinstance(part, str):
        raise TypeError(f"{what} must be a str, not {type(part).__name__}")
    if not part:
        raise ValueError(f"{what} must not be empty")
    folded = unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode("ascii").lower()
    slug = _UNSAFE.sub("-", folded).strip("-.")[:_MAX_SLUG].rstrip("-.")
    if slug != part:
        tag = hashlib.sha256(part.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug}-{tag}" if slug else tag
    return slug


def asset_key(campaign: str, row_id: str, channel: str, variant: int, seed: int, ext: str, *, tag: str | None = None) -> str:
    """Deterministic, safe key for one variant, e.g. ``spring-launch-2025/hero-01/instagram_square/v03-s12345.png``.

    Each part is slugified; a part that slugifying changed gets ``-<8 hex of sha256(original)>`` appended, so
    "Hero 01" and "hero-01" give different keys. ``tag`` (lower-case hex, e.g. the start of the variant's identity
    hash) is appended to the file name (``v03-s12345-1a2b3c4d5e.png``), so a changed prompt never overwrites the
    file of the old one.
    """
    if tag is not None and not re.fullmatch(r"[0-9a-f]{4,64}", tag):
        raise ValueError(f"tag must be 4-64 lower-case hex digits, got {tag!r}")
    for name, value in (("variant", variant), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(ext, str):
        raise TypeError(f"ext must be a str, not {type(ext).__name__}")
    extension = ext.lower().removeprefix(".")
    if not _EXT.fullmatch(extension):
        raise ValueError(f"invalid file extension {ext!r}")
    parts = (_slug(campaign, "campaign"), _slug(row_id, "row_id"), _slug(channel, "channel"))
    suffix = f"-{tag}" if tag else ""
    key = "/".join((*parts, f"v{variant:02d}-s{seed}{suffix}.{extension}"))
    return validate_key(key)


CLEAN_PREFIX = "clean/"


def clean_storage_key(key: str) -> str:
    """Where the picture without its brand overlay is stored, beside (not among) the delivered files:
    ``clean/<the delivered file's key>``."""
    return validate_key(CLEAN_PREFIX + key)

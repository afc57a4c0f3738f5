"""Contract tests run against both asset stores: a local folder and S3 (moto's server over HTTP on loopback)."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from storage import image_metadata
from storage.assets import (
    AssetStore,
    LocalAssetStore,
    S3AssetStore,
    StoredAsset,
    asset_key,
    open_store,
)

PNG = "image/png"


# ------------------------------------------------------------------------------------------------ fixtures


# s3_endpoint and s3_bucket live in conftest.py (the campaign-run tests use them too).


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AssetStore:
    if request.param == "local":
        return LocalAssetStore(tmp_path / "assets")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3AssetStore(bucket, "campaigns", endpoint_url=endpoint)


KEY = "spring-launch-2025/hero-01/instagram_square/v03-s12345.png"


# ------------------------------------------------------------------------------------------ the contract


def test_put_get_exists_delete(store: AssetStore) -> None:
    data = b"\x89PNG fake image bytes" * 10
    assert not store.exists(KEY)
    asset = store.put(KEY, data, PNG)
    assert isinstance(asset, StoredAsset)
    assert asset.key == KEY
    assert asset.size == len(data)
    assert asset.sha256 == hashlib.sha256(data).hexdigest()
    assert asset.url.startswith(store.url.split("?")[0])
    assert asset.url.endswith(KEY)
    assert store.exists(KEY)
    assert store.get(KEY) == data
    store.delete(KEY)
    assert not store.exists(KEY)
    assert store.list() == []
    store.delete(KEY)  # deleting a missing key is a no-op


def test_missing_key_raises_key_error(store: AssetStore) -> None:
    with pytest.raises(KeyError) as info:
        store.get("nope/missing.png")
    assert info.value.args == ("nope/missing.png",)
    assert not store.exists("nope/missing.png")


def test_overwrite_and_idempotent_put(store: AssetStore) -> None:
    first = store.put(KEY, b"one", PNG)
    again = store.put(KEY, b"one", PNG)
    assert again == first
    assert store.get(KEY) == b"one"
    replaced = store.put(KEY, b"two!", PNG)
    assert replaced.size == 4 and replaced.sha256 == hashlib.sha256(b"two!").hexdigest()
    assert store.get(KEY) == b"two!"
    assert store.list() == [KEY]


def test_list_with_prefix(store: AssetStore) -> None:
    keys = ["a/x/1.png", "a/x/2.png", "a/y/1.png", "ab/1.png", "b.png"]
    for k in reversed(keys):
        store.put(k, k.encode(), PNG)
    assert store.list() == sorted(keys)
    assert store.list("a/") == ["a/x/1.png", "a/x/2.png", "a/y/1.png"]
    assert store.list("a") == ["a/x/1.png", "a/x/2.png", "a/y/1.png", "ab/1.png"]
    assert store.list("a/x/") == ["a/x/1.png", "a/x/2.png"]
    assert store.list("a/x/2") == ["a/x/2.png"]
    assert store.list("zzz") == []


def test_empty_bytes(store: AssetStore) -> None:
    asset = store.put("empty.bin", b"", "application/octet-stream")
    assert asset.size == 0 and asset.sha256 == hashlib.sha256(b"").hexdigest()
    assert store.get("empty.bin") == b""


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../escape.png", "a/../../escape.png", "a/./b.png", "a//b.png", "a/", "a\\b.png",
     "..", "a/.b.png.XYZ.part", "nul\x00.png"],
)
def test_key_validation(store: AssetStore, bad: str) -> None:
    for call in (lambda: store.put(bad, b"x", PNG), lambda: store.get(bad), lambda: store.exists(bad),
                 lambda: store.delete(bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert repr(bad) in str(info.value)
    assert store.list() == []


# ----------------------------------------------------------------------------------------- local specifics


def test_local_put_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalAssetStore(tmp_path)
    for i in range(5):
        store.put(f"c/r/v{i}.png", bytes([i]) * 1000, PNG)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"c/r/v{i}.png" for i in range(5)]
    assert not list(tmp_path.rglob("*.part"))


def test_local_put_sweeps_what_a_killed_writer_left(tmp_path: Path) -> None:
    """kill -9 during write_atomic leaves ".{name}.XXXXXXXX.part" beside the target; the next put of that key (the
    re-run that renders the unrecorded variant again) removes it, with or without rewriting the file. Temporary
    files of other keys are not its to touch."""
    store = LocalAssetStore(tmp_path)
    folder = tmp_path / "c" / "r"
    folder.mkdir(parents=True)
    left = [folder / ".v0.png.k1ll3d00.part", folder / ".v0.png.0ther0ne.part"]
    other = folder / ".v1.png.k1ll3d00.part"
    for path in (*left, other):
        path.write_bytes(b"half a file")
    store.put("c/r/v0.png", b"png bytes", PNG)
    assert not any(p.exists() for p in left) and other.exists()
    (folder / ".v0.png.again000.part").write_bytes(b"half")
    store.put("c/r/v0.png", b"png bytes", PNG)  # same bytes: no write, still swept
    assert not (folder / ".v0.png.again000.part").exists()
    assert store.list() == ["c/r/v0.png"] and store.get("c/r/v0.png") == b"png bytes"


def test_local_failing_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalAssetStore(tmp_path)
    store.put("keep.png", b"old", PNG)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_metadata.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.put("new/fresh.png", b"new bytes", PNG)
    with pytest.raises(OSError, match="No space"):
        store.put("keep.png", b"replacement", PNG)
    monkeypatch.undo()
    assert not store.exists("new/fresh.png")
    assert store.get("keep.png") == b"old"  # the old object survives a failed overwrite
    assert not list(tmp_path.rglob("*.part"))
    assert store.list() == ["keep.png"]


def test_local_readers_never_see_partial_objects(tmp_path: Path) -> None:
    store = LocalAssetStore(tmp_path)
    a, b = b"A" * 200_000, b"B" * 300_000
    store.put("hot.png", a, PNG)
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            seen.add(hashlib.sha256(store.get("hot.png")).digest())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            store.put("hot.png", a if i % 2 else b, PNG)
    finally:
        stop.set()
        thread.join()
    assert seen <= {hashlib.sha256(a).digest(), hashlib.sha256(b).digest()}


def test_local_idempotent_put_does_not_rewrite(tmp_path: Path) -> None:
    store = LocalAssetStore(tmp_path)
    store.put(KEY, b"same", PNG)
    path = tmp_path / KEY
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    store.put(KEY, b"same", PNG)
    assert path.stat().st_mtime_ns == 1_000_000_000


def test_local_rejects_symlink_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    store = LocalAssetStore(root)
    with pytest.raises(ValueError, match="outside the store root"):
        store.put("link/evil.png", b"x", PNG)
    assert not list(outside.iterdir())


def test_local_delete_tidies_empty_folders(tmp_path: Path) -> None:
    store = LocalAssetStore(tmp_path / "assets")
    store.put("a/b/c.png", b"1", PNG)
    store.put("a/d.png", b"2", PNG)
    store.delete("a/b/c.png")
    assert not (tmp_path / "assets/a/b").exists()
    assert (tmp_path / "assets/a/d.png").exists()


# -------------------------------------------------------------------------------------------- S3 specifics


def test_s3_stores_sha256_metadata_and_content_type(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3AssetStore(s3_bucket, "/pre/fix/", endpoint_url=s3_endpoint)
    data = b"pixels"
    asset = store.put("x/y.png", data, PNG)
    assert asset.url == f"s3://{s3_bucket}/pre/fix/x/y.png"
    head = store.client.head_object(Bucket=s3_bucket, Key="pre/fix/x/y.png")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert head["ContentType"] == PNG
    assert head["ContentLength"] == len(data)


def test_s3_prefix_isolates_stores(s3_endpoint: str, s3_bucket: str) -> None:
    one = S3AssetStore(s3_bucket, "one", endpoint_url=s3_endpoint)
    two = S3AssetStore(s3_bucket, "one-two", endpoint_url=s3_endpoint)
    whole = S3AssetStore(s3_bucket, endpoint_url=s3_endpoint)
    one.put("k.png", b"1", PNG)
    two.put("k.png", b"2", PNG)
    assert one.list() == ["k.png"] and two.list() == ["k.png"]
    assert one.get("k.png") == b"1" and two.get("k.png") == b"2"
    assert whole.list() == ["one-two/k.png", "one/k.png"]


def test_s3_retry_configuration(s3_endpoint: str, s3_bucket: str) -> None:
    store = S3AssetStore(s3_bucket, endpoint_url=s3_endpoint, max_attempts=7)
    assert store.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 7}
    with pytest.raises(ValueError):
        S3AssetStore(s3_bucket, endpoint_url=s3_endpoint, max_attempts=0)


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 SlowDown to the first ``failures`` requests, then serves a tiny object."""

    failures = 0
    requests = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        cls = type(self)
        cls.requests += 1
        if cls.requests <= cls.failures:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
        else:
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("failures", "max_attempts", "succeeds"), [(2, 3, True), (5, 3, False)])
def test_s3_retries_transient_errors(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, failures: int, max_attempts: int, succeeds: bool
) -> None:
    from botocore.exceptions import ClientError
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)  # no sleeping
    handler = type("Flaky", (_Flaky,), {"failures": failures, "requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        store = S3AssetStore("bucket", endpoint_url=f"http://{host}:{port}", max_attempts=max_attempts)
        if succeeds:
            assert store.get("k.png") == b"hello"
        else:
            with pytest.raises(ClientError, match="SlowDown"):
                store.get("k.png")
        assert handler.requests == (failures + 1 if succeeds else max_attempts)
    finally:
        server.shutdown()
        thread.join()


# -------------------------------------------------------------------------------------------- open_store


def test_open_store_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_uri = open_store(tmp_path.as_uri())
    assert isinstance(by_uri, LocalAssetStore) and by_uri.root == tmp_path.resolve()
    by_path = open_store(str(tmp_path))
    assert isinstance(by_path, LocalAssetStore) and by_path.url == by_uri.url
    monkeypatch.chdir(tmp_path)
    relative = open_store("assets")
    assert isinstance(relative, LocalAssetStore) and relative.root == tmp_path.resolve() / "assets"
    spaced = open_store((tmp_path / "with space").as_uri())
    assert spaced.root == tmp_path.resolve() / "with space"
    assert open_store(by_uri.url).url == by_uri.url  # url round-trips


def test_open_store_s3(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/camp/aigns?endpoint_url={s3_endpoint}&max_attempts=4")
    assert isinstance(store, S3AssetStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == (s3_bucket, "camp/aigns", s3_endpoint)
    assert store.client.meta.config.retries["total_max_attempts"] == 4
    store.put("k.png", b"data", PNG)
    reopened = open_store(store.url)  # url round-trips, endpoint included
    assert isinstance(reopened, S3AssetStore) and reopened.get("k.png") == b"data"
    bare = open_store("s3://some-bucket")
    assert isinstance(bare, S3AssetStore) and (bare.bucket, bare.prefix) == ("some-bucket", "")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("gs://bucket/x", "unsupported asset store URL.*'gs'"),
        ("http://example.com/x", "unsupported asset store URL.*'http'"),
        ("", "empty"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/p?endpoint=x", "unknown parameter"),
        ("s3://bucket/p?max_attempts=many", "max_attempts must be an integer"),
        ("s3://bucket/a/../b", "invalid S3 prefix"),
        ("file://otherhost/x", "remote host"),
    ],
)
def test_open_store_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


# --------------------------------------------------------------------------------------------- asset_key

_SAFE_KEY = re.compile(r"[a-z0-9._-]+(/[a-z0-9._-]+){3}")


def test_asset_key_example_and_determinism() -> None:
    key = asset_key("spring-launch-2025", "hero-01", "instagram_square", 3, 12345, "png")
    assert key == "spring-launch-2025/hero-01/instagram_square/v03-s12345.png"
    assert asset_key("spring-launch-2025", "hero-01", "instagram_square", 3, 12345, ".PNG") == key
    assert asset_key("Spring Launch", "Hero 01", "IG", 0, 1, "png") == asset_key("Spring Launch", "Hero 01", "IG", 0, 1, "png")


def test_asset_key_is_safe_and_distinct() -> None:
    nasty = ["Hero 01", "hero-01", "HERO-01", "hero_01", "../etc", "..", ".", "a/b", "a\\b", "Crème brûlée",
             "日本語", "!!!", "x" * 300, "x" * 301, " hero-01", "hero-01.", ".part"]
    keys = {asset_key(n, n, n, 1, 2, "png") for n in nasty}
    assert len(keys) == len(nasty)
    for key in keys:
        assert _SAFE_KEY.fullmatch(key), key
        assert all(len(part) <= 100 and part not in (".", "..") for part in key.split("/"))
    # Each part is independent: moving text between parts cannot collide.
    assert asset_key("a", "b-c", "d", 1, 2, "png") != asset_key("a-b", "c", "d", 1, 2, "png")
    assert asset_key("c", "r", "ch", 1, 23, "png") != asset_key("c", "r", "ch", 12, 3, "png")
    assert asset_key("c", "Hero 01", "ch", 1, 2, "png").startswith("c/hero-01-")


def test_asset_key_works_as_store_key(tmp_path: Path) -> None:
    store = LocalAssetStore(tmp_path)
    key = asset_key("../../Campaign", "Row/1", "ch", 1, 2, "png")
    store.put(key, b"x", PNG)
    assert store.list() == [key]
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "args",
    [("", "r", "c", 1, 2, "png"), ("c", "r", "c", -1, 2, "png"), ("c", "r", "c", 1, -2, "png"),
     ("c", "r", "c", True, 2, "png"), ("c", "r", "c", 1, 2, "p/ng"), ("c", "r", "c", 1, 2, "")],
)
def test_asset_key_rejects_bad_input(args: tuple) -> None:
    with pytest.raises(ValueError):
        asset_key(*args)

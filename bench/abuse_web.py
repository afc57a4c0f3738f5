"""Abusive requests to the gallery, at the issue's sizes, over real sockets to a real uvicorn server in this process
(so the peak memory bench/abuse.py prints is the server's): 600 MB bodies with and without a cookie, declared and
chunked, a 200 MB multipart upload, 200 form fields of 1 MB, 200 wrong passwords, ids past 2^63, an unknown
sampler; and the export command's file names (a format spec of 20 digits, a 5000-character row id)."""

from __future__ import annotations

import html
import re
import socket
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MB = 1024 * 1024
HUGE = "99999999999999999999"


@contextmanager
def gallery(scratch: Path, **world_kw) -> Iterator[tuple[object, str]]:
    """A world (users ada / rita / vic) and the gallery over it on 127.0.0.1: (world, base URL)."""
    from cli.review import known_samplers
    from review.app import create_app
    from storage.assets import open_store
    from storage.database import open_database, sqlite_url
    from tests.review.world import build_world, serve_app

    url, store_url = sqlite_url(scratch / "adforge.db"), str(scratch / "assets")
    db = open_database(url)
    world = build_world(db, open_store(store_url), store_url, **world_kw)
    app = create_app(url, store_url, secret_key="bench", cache_dir=scratch / "thumbs", samplers=known_samplers())
    server, thread, port = serve_app(app)
    try:
        yield world, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        db.dispose()


def signed_in(base: str, name: str):
    """An httpx client signed in as ``name``, and its CSRF token."""
    import httpx

    from tests.review.world import PASSWORD

    client = httpx.Client(base_url=base, follow_redirects=False, timeout=60)
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)
    assert client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token}).status_code == 303
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)
    return client, token


def stream_post(base: str, path: str, total: int, *, chunked: bool, headers: dict[str, str] | None = None,
                first: bytes = b"", block: bytes = b" " * MB) -> str:
    """POST ``total`` bytes, ``block`` after ``block`` (one buffer, reused), as fast as the server takes them;
    returns the answer's status and detail and how much was sent before it came."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in (headers or {}).items()),
             "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    sent = 0
    done = threading.Event()

    def send() -> None:
        nonlocal sent
        try:
            piece = first + block[len(first):]
            while sent < total and not done.is_set():
                data = piece[:total - sent]
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
                sent += len(data)
                piece = block
            if chunked and not done.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed: what we want
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sock.settimeout(90)
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        return f"no answer after 90 s; {sent / MB:.0f} MB sent"
    finally:
        done.set()
        sock.close()
        sender.join(5)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    text = body.decode("utf-8", "replace")
    page = re.search(r'class="error-message">([^<]*)<', text)  # a page's answer: its one line
    detail = html.unescape(page.group(1)) if page else text.strip()[:100]
    return f"{status.removeprefix('HTTP/1.1 ')} {detail!r}; {sent / MB:.1f} MB of {total / MB:.0f} MB sent before the answer"


def _length(answer: bytes) -> int:
    m = re.search(rb"(?i)content-length: *(\d+)", answer)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------------------ probes


def baseline_one_get(scratch: Path) -> str:
    """The same process with no abuse: the gallery (engine sampler list included) and one signed-in page."""
    with gallery(scratch) as (_, base):
        client, _ = signed_in(base, "rita")
        return f"GET / {client.get('/').status_code}"


def json_600mb_no_cookie(scratch: Path) -> str:
    with gallery(scratch) as (_, base):
        return stream_post(base, "/api/variants/1/review", 600 * MB, chunked=False, headers={"Content-Type": "application/json"})


def json_600mb_chunked_no_cookie(scratch: Path) -> str:
    with gallery(scratch) as (_, base):
        return stream_post(base, "/api/variants/1/review", 600 * MB, chunked=True, headers={"Content-Type": "application/json"})


def json_600mb_chunked_signed_in(scratch: Path) -> str:
    with gallery(scratch) as (_, base):
        client, token = signed_in(base, "rita")
        cookie = f"adforge_session={client.cookies['adforge_session']}"
        return stream_post(base, "/api/variants/1/review", 600 * MB, chunked=True,
                           headers={"Content-Type": "application/json", "Cookie": cookie, "X-CSRF-Token": token})


def multipart_200mb_results_no_cookie(scratch: Path) -> str:
    with gallery(scratch) as (w, base):
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="r.csv"\r\n\r\n'
        return stream_post(base, f"/campaigns/{w.campaign_id}/results", 200 * MB, chunked=True, first=head,
                           headers={"Content-Type": "multipart/form-data; boundary=x"})


def multipart_200mb_results_signed_in(scratch: Path) -> str:
    with gallery(scratch) as (w, base):
        client, token = signed_in(base, "rita")
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="r.csv"\r\n\r\n'
        return stream_post(base, f"/campaigns/{w.campaign_id}/results", 200 * MB, chunked=True, first=head,
                           headers={"Content-Type": "multipart/form-data; boundary=x", "X-CSRF-Token": token,
                                    "Cookie": f"adforge_session={client.cookies['adforge_session']}"})


def form_200_fields_of_1mb_signed_in(scratch: Path) -> str:
    with gallery(scratch) as (_, base):
        client, token = signed_in(base, "rita")
        field = b"f=" + b"a" * (MB - 3) + b"&"  # 200 fields of 1 MB each
        return stream_post(base, "/variants/1/review", 200 * MB, chunked=True, block=field,
                           headers={"Content-Type": "application/x-www-form-urlencoded",
                                    "Cookie": f"adforge_session={client.cookies['adforge_session']}"})


def sign_in_200_wrong_passwords(scratch: Path) -> str:
    import httpx

    import review.auth

    review.auth._hasher = review.auth.PasswordHasher()  # the real cost, as the probe had
    with gallery(scratch) as (_, base):
        client = httpx.Client(base_url=base, follow_redirects=False, timeout=60)
        token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)
        answers: Counter[str] = Counter()
        for i in range(200):
            r = client.post("/login", data={"name": "rita", "password": f"guess-{i}", "csrf_token": token})
            m = re.search(r'id="login-error">([^<]*)<', r.text)
            answers[f"{r.status_code} {m.group(1) if m else ''}"] += 1
        return "; ".join(f"{n} x {a}" for a, n in answers.items())


def ids_past_2_63(scratch: Path) -> str:
    with gallery(scratch) as (w, base):
        client, token = signed_in(base, "rita")
        urls = [f"/assets/{HUGE}", f"/thumbs/{HUGE}", f"/variants/{HUGE}", f"/api/variants/{HUGE}", f"/campaigns/{HUGE}",
                f"/campaigns/{w.campaign_id}/gallery?row={HUGE}", f"/campaigns/{w.campaign_id}/gallery?model={HUGE}",
                f"/compare?ids={HUGE},1"]
        statuses = [client.get(u).status_code for u in urls]
        statuses.append(client.post(f"/api/variants/{HUGE}/review", json={"status": "approved"},
                                    headers={"X-CSRF-Token": token}).status_code)
        detail = client.get(f"/api/variants/{HUGE}").json()["detail"]
        return f"statuses {statuses}; e.g. {detail!r}"


def unknown_sampler(scratch: Path) -> str:
    with gallery(scratch) as (_, base):
        client, token = signed_in(base, "rita")
        r = client.post("/api/variants/1/rerender", json={"sampler": "Heun++ 9000"}, headers={"X-CSRF-Token": token})
        return f"{r.status_code} {r.json()['detail']}"


def _export(scratch: Path, *extra: str, **world_kw) -> tuple[str, Path]:
    from typer.testing import CliRunner

    from cli.app import app
    from storage.assets import open_store
    from storage.database import open_database, sqlite_url
    from tests.review.world import build_world

    url, store_url = sqlite_url(scratch / "adforge.db"), str(scratch / "assets")
    db = open_database(url)
    build_world(db, open_store(store_url), store_url, **world_kw)
    db.dispose()
    out = scratch / "out.zip"
    r = CliRunner().invoke(app, ["export", "-c", "spring-launch", "--db", url, "--store", store_url, "-o", str(out), *extra])
    return f"exit {r.exit_code}: {(r.stderr or r.output).strip()}", out


def export_name_with_a_20_digit_width(scratch: Path) -> str:
    return _export(scratch, "--name", "skyscraper={seed:>99999999999999999999}")[0]


def export_5000_character_row_id(scratch: Path) -> str:
    said, out = _export(scratch, row_keys=("r" * 5000, "r" * 4999 + "2"))
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        zf.extractall(scratch / "unzipped")
    longest = max(len(n.encode()) for n in names)
    return f"{len(names)} entries, unique: {len(set(names)) == len(names)}, longest {longest} bytes, extracted; {said[:60]}"


PROBES: dict[str, Callable[[Path], str]] = {
    f"web_{f.__name__}": f for f in (
        baseline_one_get, json_600mb_no_cookie, json_600mb_chunked_no_cookie, json_600mb_chunked_signed_in,
        multipart_200mb_results_no_cookie, multipart_200mb_results_signed_in, form_200_fields_of_1mb_signed_in,
        sign_in_200_wrong_passwords, ids_past_2_63, unknown_sampler, export_name_with_a_20_digit_width,
        export_5000_character_row_id,
    )
}

if __name__ == "__main__":  # one probe by hand: python bench/abuse_web.py NAME
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        print(PROBES[sys.argv[1]](Path(d)), f"({time.perf_counter() - t:.1f} s)")

"""Abusive results files and runs under failure (issue 28, runs items), each through the real code path: results
CSVs of 2.85M duplicate rows, 1M bad rows, huge numbers, a 200 KB cell and a 50 MB line into
:func:`review.results.import_results`; ``adforge run`` on a corrupt SQLite file, on a database whose disk fills
mid-run, killed with SIGKILL (is its temporary Prefect server gone?), and twice at once on one brief.

Run through ``bench/abuse.py runs``, which starts each probe in a fresh process and prints its seconds and peak RSS
(of the probe's process; the ``adforge run`` subprocesses are not counted).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DUPLICATES = 2_850_000  # the probe
BAD_ROWS = 1_000_000
TWIN_BRIEF = "campaign,row_id,subject,channels,variants\n" + "".join(
    f"twins,row-{i},a {c} circle,instagram_square,8\n" for i, c in enumerate(("red", "blue")))


# ------------------------------------------------------------------------------------------------ results files


def _world(scratch: Path):
    """A database with one campaign of stored assets (the review tests' world); returns (db, first asset id)."""
    from storage.assets import LocalAssetStore
    from storage.database import open_database, sqlite_url
    from tests.review.world import build_world

    import review.auth
    from argon2 import PasswordHasher

    review.auth._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # users are not the probe
    db = open_database(sqlite_url(scratch / "adforge.db"))
    world = build_world(db, LocalAssetStore(scratch / "assets"), str(scratch / "assets"), per_channel=1)
    return db, min(world.assets.values())


def _import(scratch: Path, make: Callable[[int], bytes]) -> str:
    """Import the file ``make(asset id)`` builds; the outcome and the size of the answer a user would see."""
    from review.results import ResultsError, import_results

    db, aid = _world(scratch)
    data = make(aid)
    try:
        summary = import_results(db, data, "results.csv", actor="bench")
        return f"imported {summary.rows} row(s)"
    except ResultsError as exc:
        page = "\n".join(exc.problems)
        return (f"{len(data) / 2**20:.0f} MB rejected: {len(exc.problems)} line(s), {len(page)} chars: "
                f"{exc.problems[0]} | {exc.problems[-1]}")
    finally:
        db.dispose()


def results_duplicates(scratch: Path) -> str:
    return _import(scratch, lambda aid: b"asset_id,impressions,clicks\n" + f"{aid},100,5\n".encode() * DUPLICATES)


def results_bad_rows(scratch: Path) -> str:
    return _import(scratch, lambda aid: b"asset_id,impressions,clicks\n" +
                   b"".join(b"%d,ten,1\n" % (10**6 + n) for n in range(BAD_ROWS)))


def results_huge_numbers(scratch: Path) -> str:
    return _import(scratch, lambda aid: (f"asset_id,impressions,clicks\n{2**63},10,1\n{aid},{2**63},1\n{aid},-5,1\n"
                                         f"{aid},{'9' * 5000},1\n").encode())


def results_huge_cell(scratch: Path) -> str:
    return _import(scratch, lambda aid: b"file_name,impressions,clicks\n" + b"x" * 200_000 + b",10,1\n")


def results_endless_line(scratch: Path) -> str:
    return _import(scratch, lambda aid: b"asset_id,impressions,clicks\n" + b"1," * (25 * 2**20))


# ------------------------------------------------------------------------------------------------ runs


def _model(scratch: Path) -> Path:
    """A tiny random SD1 checkpoint (64 px), written by a child process: torch is not the probe's memory."""
    path = scratch / "tiny.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, "-c", "import sys; from engine.random_checkpoint import write_random_sd1; "
                        "write_random_sd1(sys.argv[1], seed=3, metadata={'adforge.native_size': '64', "
                        "'modelspec.license': 'Apache-2.0', 'modelspec.title': 'tiny'})", str(path)],
                       cwd=ROOT, check=True)
    return path


def _run_cmd(scratch: Path, db_url: str, *extra: str) -> list[str]:
    brief = scratch / "twins.csv"
    brief.write_text(TWIN_BRIEF)
    return [sys.executable, "-m", "cli", "run", str(brief), "--db", db_url, "--store", str(scratch / "assets"),
            "--model", str(_model(scratch)),
            "--steps", "2", *extra]


def _env(scratch: Path) -> dict[str, str]:
    """Each run gets its own temporary Prefect server (no PREFECT_API_URL), as a user's `adforge run` does."""
    (scratch / "prefect-home").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(scratch / "prefect-home"), COLUMNS="200")
    return env


def run_corrupt_sqlite(scratch: Path) -> str:
    from storage.database import sqlite_url

    (scratch / "adforge.db").write_bytes(os.urandom(64 * 1024))
    done = subprocess.run(_run_cmd(scratch, sqlite_url(scratch / "adforge.db")), cwd=ROOT, env=_env(scratch),
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    return f"exit {done.returncode}, {len(out.splitlines())} line(s), traceback: {'Traceback' in out}: {' | '.join(errors)}"


def run_disk_full_mid_run(scratch: Path) -> str:
    """The run's database cannot grow once planning is done (SQLite max_page_count: SQLITE_FULL, as a full disk)."""
    from sqlalchemy import event, select

    from flows.campaign import campaign_run, open_resources, set_progress_listener
    from flows.prefect_server import start_temporary_server
    from flows.recording import mark_crashed_runs
    from flows.settings import load_settings
    from storage.database import DatabaseError, open_database, sqlite_url
    from storage.schema import Run

    os.environ.update(_env(scratch))
    start_temporary_server()
    brief = scratch / "twins.csv"
    brief.write_text(TWIN_BRIEF)
    url = sqlite_url(scratch / "adforge.db")
    overrides = {"db_url": url, "store_url": str(scratch / "assets"), "model": str(_model(scratch)), "steps": 1,
                 "batch_size": 16}
    settings = load_settings(overrides)
    pages: dict = {}

    def cap(dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages['n']}")

    def on_event(name: str, _count: int) -> None:
        if name == "planned":
            db, _ = open_resources(settings)
            with db.engine.connect() as conn:
                pages["n"] = conn.exec_driver_sql("PRAGMA page_count").scalar()
            event.listen(db.engine, "connect", cap)
            db.engine.dispose()
            pages["engine"] = db.engine

    set_progress_listener(on_event)
    try:
        campaign_run(str(brief), overrides=overrides)
        outcome = "the run completed?"
    except DatabaseError as exc:
        outcome = str(exc)
    set_progress_listener(None)
    event.remove(pages["engine"], "connect", cap)
    pages["engine"].dispose()
    db = open_database(url)
    mark_crashed_runs(db)
    with db.session() as s:
        status = [r.status for r in s.scalars(select(Run))]
    return f"{outcome}; once the disk has room the run is {status}"


def _server_of(run: subprocess.Popen, timeout: float = 180):
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        for child in psutil.Process(run.pid).children(recursive=True):
            try:
                if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                pass
        time.sleep(0.1)
    return None


def _serving(server, timeout: float = 120) -> None:
    """Wait until the server answers (killing the run during its start would test less)."""
    import urllib.request

    args = server.cmdline()
    url = f"http://127.0.0.1:{args[args.index('--port') + 1]}/api/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)


def run_killed_server(scratch: Path) -> str:
    import psutil

    from storage.database import sqlite_url

    run = subprocess.Popen(_run_cmd(scratch, sqlite_url(scratch / "adforge.db")), cwd=ROOT, env=_env(scratch),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = _server_of(run)
    if server is None:
        run.kill()
        return "no temporary server seen"
    _serving(server)
    rss = server.memory_info().rss / 2**20
    run.send_signal(signal.SIGKILL)
    run.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 100:
        try:
            if server.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        server.kill()
        return f"temporary server ({rss:.0f} MB) still alive 100 s after SIGKILL of the run"
    return f"temporary server ({rss:.0f} MB) gone {time.monotonic() - t0:.2f} s after SIGKILL of the run"


def run_twice_at_once(scratch: Path) -> str:
    from storage.database import sqlite_url

    url = sqlite_url(scratch / "adforge.db")
    _model(scratch)
    runs = [subprocess.Popen(_run_cmd(scratch, url, "--batch-size", "2"), cwd=ROOT, env=_env(scratch / f"p{k}"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outs = [r.communicate(timeout=600)[0] for r in runs]
    said = []
    for out in outs:
        m = re.search(r"(completed\S*): planned (\d+), rendered (\d+), already there (\d+)", out)
        said.append(m.groups() if m else ("?", "?", "?", "?"))
    rendered = sum(int(s[2]) for s in said if s[2] != "?")
    return f"two runs of 16: rendered {rendered} in total ({', '.join(f'rendered {s[2]} / skipped {s[3]}' for s in said)})"


PROBES: dict[str, Callable[[Path], str]] = {
    "runs: results 2.85M duplicate rows": results_duplicates,
    "runs: results 1M bad rows": results_bad_rows,
    "runs: results ids/counts >= 2^63, 5000 digits": results_huge_numbers,
    "runs: results 200 KB cell": results_huge_cell,
    "runs: results 50 MB line": results_endless_line,
    "runs: adforge run on a corrupt SQLite file": run_corrupt_sqlite,
    "runs: disk full mid-run (SQLITE_FULL)": run_disk_full_mid_run,
    "runs: kill -9 of adforge run": run_killed_server,
    "runs: two runs of one brief at once": run_twice_at_once,
}

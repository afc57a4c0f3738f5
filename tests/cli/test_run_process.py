"""`adforge run` as a process: what it prints when its database is broken, and what it leaves behind when killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from storage.database import sqlite_url
from tests.helpers import ROOT

BRIEF = "campaign,row_id,subject,channels,variants\nproc,row-1,a red circle,instagram_square,2\n"


def _run_cmd(tmp_path: Path, model: Path, db_url: str) -> list[str]:
    brief = tmp_path / "brief.csv"
    brief.write_text(BRIEF)
    return [sys.executable, "-m", "cli", "run", str(brief), "--db", db_url, "--store", str(tmp_path / "assets"),
            "--model", str(model), "--steps", "1"]


def test_a_corrupt_database_is_one_line_without_a_traceback(tmp_path: Path, campaign_model: Path,
                                                            prefect_harness: str) -> None:
    db_file = tmp_path / "adforge.db"
    db_file.write_bytes(os.urandom(32 * 1024))
    env = dict(os.environ, PREFECT_API_URL=prefect_harness, COLUMNS="200")
    done = subprocess.run(_run_cmd(tmp_path, campaign_model, sqlite_url(db_file)), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert errors == [f"error: cannot open database {sqlite_url(db_file)}: file is not a database"], out


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_temporary_prefect_server_with_it(tmp_path: Path, campaign_model: Path) -> None:
    """The probe: kill -9 of `adforge run` left Prefect's temporary server (~200 MB) running for good."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own temporary server, not the session's
    run = subprocess.Popen(_run_cmd(tmp_path, campaign_model, sqlite_url(tmp_path / "adforge.db")), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 180
        while server is None and time.monotonic() < deadline and run.poll() is None:
            for child in psutil.Process(run.pid).children(recursive=True):
                try:
                    if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                        server = child
                except psutil.Error:
                    pass
            time.sleep(0.1)
        assert server is not None, "the run started no temporary Prefect server"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    try:
        deadline = time.monotonic() + 30
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), "the temporary Prefect server outlived the killed run"
    finally:
        if _alive(server):
            server.kill()

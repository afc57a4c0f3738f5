"""``adforge runs --stats`` as a user types it, after a real run: one table row per run with its figures, a total row
per campaign, the cost at the configured price per device-hour."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli.app import app
from flows.campaign import close_resources
from flows.rendering import clear_pipelines
from storage.database import open_database, sqlite_url
from storage.schema import Run
from tests.helpers import templates_with_channels, write_brief

CHANNELS = ("  s_png:\n    width: 64\n    height: 64\n    format: png\n    max_kb: 8192\n"
            "  s_impossible:\n    width: 256\n    height: 256\n    format: png\n    max_kb: 1\n")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: str) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_MODEL", "ADFORGE_CONFIG", "ADFORGE_PRICE_PER_DEVICE_HOUR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "220")  # the table's width when the output is not a terminal
    yield tmp_path
    close_resources()
    clear_pipelines()


def _row(out: str, first_cell: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{out}")


def test_runs_stats_shows_each_run_and_the_campaign_totals(in_tmp: Path, campaign_model: Path) -> None:
    templates = templates_with_channels(in_tmp, CHANNELS)
    (in_tmp / "adforge.toml").write_text(f'[adforge]\ntemplates_dir = "{templates.as_posix()}"\nsteps = 1\n'
                                         f'price_per_device_hour = 36.0\n')
    brief = write_brief(in_tmp / "brief.csv", ['stats-c,r1,a red circle,"s_png, s_impossible",2'],
                        ["campaign", "row_id", "subject", "channels", "variants"])
    ran = CliRunner().invoke(app, ["run", str(brief), "--model", str(campaign_model)])
    assert ran.exit_code == 1 and "completed_with_failures" in ran.output, ran.output  # a run with failures: 1

    result = CliRunner().invoke(app, ["runs", "--stats"])
    assert result.exit_code == 0, result.output
    out = result.output
    run = _row(out, "1")
    assert run[1:7] == ["completed_with_failures", "stats-c", "2", "2", "50.0", "0"]
    db = open_database(sqlite_url(in_tmp / "adforge-data" / "adforge.db"))
    with db.session() as s:
        seconds = s.scalars(select(Run)).one().timings["devices"]["cpu"]["seconds"]
    db.dispose()
    assert run[10] == f"{seconds / 3600:.4f}"
    assert run[11] == f"{seconds / 3600 * 36.0 / 2:.5f}"  # cost per image at the price the run was started with
    total = _row(out, "total")
    assert total[1:7] == ["1 run(s)", "stats-c", "2", "2", "50.0", "0"]
    assert "cost = device-hours x the run's price per device-hour" in " ".join(out.split())
    assert re.search(r"run 1: cpu \d+\.\d device-s", out) and "GiB" not in out  # no device memory on the CPU

    plain = CliRunner().invoke(app, ["runs"])
    assert plain.exit_code == 0 and "completed_with_failures" in plain.output and "device-h" not in plain.output

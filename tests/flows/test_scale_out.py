"""Many machines, on loopback: a campaign run fans out as shard flow runs of the ``campaign-shard`` deployment,
which two real Prefect process workers pick up; one worker is killed (with its flow-run process) in the middle of a
shard, and the run re-submits that shard to the other.

The loopback test runs its own ``prefect server start`` (PostgreSQL-backed: a fresh database on the test
PostgreSQL server), in subprocesses only, so it never touches the session's ``prefect_harness``: every Prefect
command and client here names its server's URL explicitly. The shared store is S3 (moto on loopback) and the
shared database PostgreSQL, as in the README's "Many machines" setup. Without PostgreSQL (locally) it falls back
to SQLite for both and says so; under CI=true a missing PostgreSQL fails it.

The fast tests at the top cover splitting, shard settings and worker liveness without any server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from sqlalchemy import create_engine, func, select, text

from flows.settings import load_settings
from flows.sharding import (LOST_AFTER_HEARTBEATS, LOST_GRACE_SECONDS, ShardError, _Liveness, run_shards,
                            shard_parameters, shard_settings, split_into_shards)
from storage.assets import open_store
from storage.database import open_database, sqlite_url
from storage.schema import Asset, AuditEntry, Run, Variant
from tests.helpers import POSTGRES_URL, ROOT, run_prefect

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------ fast: no server


def test_shards_are_contiguous_equal_slices_of_engine_batches() -> None:
    # Two planned batches (two models or sizes) of 8 and 4 ids, engine batches of 2: 6 engine batches.
    batches = [list(range(1, 9)), list(range(101, 105))]
    assert split_into_shards(batches, 3, 2) == [[[1, 2, 3, 4]], [[5, 6, 7, 8]], [[101, 102, 103, 104]]]
    four = split_into_shards(batches, 4, 2)
    assert four == [[[1, 2]], [[3, 4, 5, 6]], [[7, 8]], [[101, 102, 103, 104]]]  # 1, 2, 1, 2 engine batches
    # A slice across two planned batches keeps them apart (one model and size per batch).
    assert split_into_shards([list(range(1, 7)), [101, 102, 103, 104]], 2, 2) == [
        [[1, 2, 3, 4]], [[5, 6], [101, 102, 103, 104]]]
    # Never more shards than engine batches, never an empty one.
    assert split_into_shards([[1, 2, 3]], 8, 2) == [[[1, 2]], [[3]]]


def test_shard_settings_carry_the_database_unless_it_has_a_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("ADFORGE_DB_URL", "ADFORGE_STORE_URL", "ADFORGE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    plain = load_settings({"db_url": "postgresql+psycopg://adforge@db.internal/adforge", "store_url": "s3://b/p",
                           "batch_size": 8, "devices": "cuda:0"})
    params = shard_parameters(plain)
    assert params == {"db_url": "postgresql+psycopg://adforge@db.internal/adforge", "store_url": "s3://b/p",
                      "batch_size": 8, "dtype": "auto"}  # devices are each machine's own
    assert shard_settings(params).db_url == plain.db_url

    secret = load_settings({"db_url": "postgresql+psycopg://adforge:hunter2@db.internal/adforge", "store_url": "s3://b/p"})
    params = shard_parameters(secret)
    assert "hunter2" not in repr(params)  # flow-run parameters are shown in Prefect's UI
    assert params["expect_db_url"] == "postgresql+psycopg://adforge:***@db.internal/adforge"
    with pytest.raises(ShardError, match=r"this worker's database sqlite:///.* is not the run's "
                                         r"postgresql\+psycopg://adforge:\*\*\*@db.internal/adforge: set ADFORGE_DB_URL"):
        shard_settings(params)
    monkeypatch.setenv("ADFORGE_DB_URL", "postgresql+psycopg://adforge:hunter2@db.internal/adforge")
    assert shard_settings(params).db_url == secret.db_url
    with pytest.raises(ShardError, match="unknown shard settings: devices"):
        shard_settings({"devices": "cpu"})


def test_a_worker_is_lost_when_its_heartbeat_stops_moving() -> None:
    def worker(beat: int, status: str = "ONLINE") -> SimpleNamespace:
        return SimpleNamespace(status=status, last_heartbeat_time=beat, heartbeat_interval_seconds=2)

    live = _Liveness()
    limit = LOST_AFTER_HEARTBEATS * 2 + LOST_GRACE_SECONDS
    assert not live.lost("w", {"w": worker(1)}, now=100.0)
    assert not live.lost("w", {"w": worker(2)}, now=100.0 + limit + 1)  # it moved: alive, whatever the clocks say
    assert not live.lost("w", {"w": worker(2)}, now=100.0 + 2 * limit)  # unchanged for exactly the limit
    assert live.lost("w", {"w": worker(2)}, now=100.0 + 2 * limit + 2)
    assert live.lost("x", {"x": worker(5, "OFFLINE")}, now=0.0)  # the server says so
    assert live.lost("gone", {}, now=0.0)  # no longer listed in the pool


def test_fan_out_without_the_shard_deployment_says_what_to_do(prefect_harness: str, tmp_path: Path) -> None:
    settings = load_settings({"db_url": sqlite_url(tmp_path / "a.db"), "store_url": str(tmp_path / "s"), "fan_out": 2})
    db = open_database(settings.db_url)
    with pytest.raises(ShardError, match=r"fan-out needs the campaign-shard/not-deployed deployment on the Prefect "
                                         r"server \(PREFECT_API_URL\): run `prefect deploy --all`"):
        run_shards(1, [[1, 2, 3]], settings, db=db, deployment="campaign-shard/not-deployed")
    db.dispose()


# ------------------------------------------------------------------------------------------------ loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect server it may point at (the session harness), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING", **extra)
    return env


@dataclass
class Backends:
    prefect_db: str  # PREFECT_API_DATABASE_CONNECTION_URL
    adforge_db: str
    kind: str


@pytest.fixture
def backends(tmp_path: Path, service_missing) -> Iterator[Backends]:
    """A fresh PostgreSQL database for the Prefect server and one for adforge; SQLite files without PostgreSQL."""
    try:
        admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        if os.environ.get("CI"):
            service_missing(f"PostgreSQL at {POSTGRES_URL} ({type(exc).__name__}: {exc})")
        warnings.warn(f"PostgreSQL at {POSTGRES_URL} unavailable ({type(exc).__name__}); the loopback test runs its "
                      f"Prefect server and adforge database on SQLite instead")
        yield Backends(f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}", sqlite_url(tmp_path / "adforge.db"), "sqlite")
        return
    names = [f"adforge_scale_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield Backends(f"{base.replace('+psycopg', '+asyncpg')}/{names[0]}", f"{base}/{names[1]}", "postgresql")
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Processes:
    """Subprocesses of one test, each with its output in a file; all stopped (with their children) at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def kill_tree(self, name: str) -> list[int]:
        """SIGKILL a process and everything it started (a process worker starts each flow run in a session of its
        own), the way a machine that dies takes them; the worker first, so it cannot report its runs crashed."""
        root = psutil.Process(self.procs[name].pid)
        tree = [root, *root.children(recursive=True)]
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.procs[name].wait(timeout=30)
        return [p.pid for p in tree]

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for p in tree:
                    try:
                        p.terminate()
                    except psutil.NoSuchProcess:
                        pass
                _, alive = psutil.wait_procs(tree, timeout=10)
                for p in alive:
                    p.kill()


def _wait_for(what: str, check, timeout: float, procs: Processes, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    logs = "\n".join(f"--- {name}\n{procs.log(name)[-3000:]}" for name in procs.procs)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{logs}")


ROWS = 4
PER_ROW = 6
VARIANTS = ROWS * PER_ROW
SCALE_BRIEF = "campaign,row_id,subject,channels,variants\n" + "".join(
    f"scale-out,row-{i},a {colour} square,instagram_square,{PER_ROW}\n" for i, colour in enumerate(("red", "green", "blue", "pink"))
)


@pytest.mark.slow
def test_shards_spread_over_two_workers_and_a_killed_worker_shard_is_retried(
        tmp_path: Path, campaign_model: Path, backends: Backends, s3_endpoint: str, s3_bucket: str) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    procs = Processes(tmp_path)
    started = time.monotonic()

    def phase(what: str) -> None:  # shown with the output of a failure, and with -s
        print(f"{time.monotonic() - started:6.1f} s  {what}")

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    try:
        # The server, on its own database (a fresh PostgreSQL database; see the fixture).
        procs.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                    _base_env(PREFECT_HOME=str(tmp_path / "prefect-server"),
                              PREFECT_API_DATABASE_CONNECTION_URL=backends.prefect_db))
        client = SyncPrefectClient(api)
        client.__enter__()

        def healthy() -> bool:
            if procs.procs["server"].poll() is not None:
                pytest.fail(f"prefect server exited:\n{procs.log('server')}")
            try:
                return client.api_healthcheck() is None
            except Exception:
                return False

        _wait_for("the Prefect server answering", healthy, 120, procs)
        phase(f"server up ({backends.kind})")

        # The pool and the shard deployment, exactly as the README does it (only the deployment this test needs:
        # the inbox's 15-minute schedule would put other flow runs on the workers).
        # One torch thread per process, as in this process (tests/conftest.py): on a 2-core machine running a server,
        # two workers' flow runs and the run itself, OpenMP threads spinning against each other cost 10-100x.
        env = _base_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-client"), OMP_NUM_THREADS="1")
        run_prefect("work-pool", "create", "adforge", "--type", "process", env=env)
        workers_env = dict(env, ADFORGE_PROJECT_DIR=str(ROOT), ADFORGE_DEVICES="cpu",
                           # Heartbeats every second, so a dead worker shows within seconds, not minutes.
                           PREFECT_WORKER_HEARTBEAT_SECONDS="1", PREFECT_WORKER_QUERY_SECONDS="1")
        for name in ("w1", "w2"):
            procs.start(name, [str(BIN / "prefect"), "worker", "start", "--pool", "adforge", "--type", "process",
                               "--limit", "1", "--name", name], workers_env)
        run_prefect("--no-prompt", "deploy", "--name", "campaign-shard", env=env)
        phase("deployed")
        _wait_for("both workers online", lambda: {w.name for w in client.read_workers_for_work_pool("adforge")
                                                  if w.status.value == "ONLINE"} == {"w1", "w2"}, 60, procs)
        phase("workers online")

        # The campaign: 24 variants in 12 engine batches, 2 shards of 6; the CLI, as a user runs it.
        brief = tmp_path / "scale.csv"
        brief.write_text(SCALE_BRIEF)
        store_url = f"s3://{s3_bucket}/assets?endpoint_url={s3_endpoint}"
        run = procs.start("run", [str(BIN / "adforge"), "run", str(brief), "--fan-out", "2", "--steps", "16",
                                  "--batch-size", "2", "--db", backends.adforge_db, "--store", store_url,
                                  "--model", str(campaign_model)], env, cwd=tmp_path)

        db = open_database(backends.adforge_db, upgrade=False)
        shard_filter = DeploymentFilter(name=DeploymentFilterName(any_=["campaign-shard"]))

        def shard_runs():
            return client.read_flow_runs(deployment_filter=shard_filter)

        def assets_among(ids: list[int]) -> int:
            with db.session() as s:
                return s.scalar(select(func.count(Asset.id)).where(Asset.variant_id.in_(ids))) or 0

        def victim():
            """A worker half-way through its shard: some of its variants recorded, not all."""
            if run.poll() is not None:
                pytest.fail(f"the run ended before a worker could be killed:\n{procs.log('run')}")
            try:
                runs = shard_runs()
            except Exception:
                return None
            for r in runs:
                worker = r.labels.get("prefect.worker.name")
                if r.state and r.state.is_running() and worker:
                    ids = [i for batch in r.parameters["batches"] for i in batch]
                    if 0 < assets_among(ids) < len(ids):
                        return worker, r, ids
            return None

        worker, killed_run, killed_ids = _wait_for("a worker half-way through its shard", victim, 240, procs, 0.25)
        done_before_kill = assets_among(killed_ids)
        procs.kill_tree(worker)
        phase(f"killed {worker} with {done_before_kill} of its shard's {len(killed_ids)} variants done")
        survivor = {"w1": "w2", "w2": "w1"}[worker]

        _wait_for("the run to finish", lambda: run.poll() is not None, 240, procs)
        phase("run finished")
        output = procs.log("run")
        assert run.returncode == 0, output
        assert "completed: planned 24, rendered 24, already there 0, failed 0" in output
        assert "shards:   2 on 2 worker(s) (w1, w2), 1 re-submitted" in output

        # Prefect: both workers took a shard; the killed one's flow run is crashed, and its second flow run completed
        # on the other worker, after that worker's own shard.
        runs = shard_runs()
        for r in sorted(runs, key=lambda r: r.expected_start_time):
            phase(f"{r.name} on {r.labels.get('prefect.worker.name')}: {r.state.type.value}, ran {r.total_run_time}")
        by_id = {r.id: r for r in runs}
        assert by_id[killed_run.id].state.type.value == "CRASHED"
        assert f"worker {worker} stopped sending heartbeats" in by_id[killed_run.id].state.message
        [retry] = [r for r in runs if r.name == f"{killed_run.name}-attempt-2"]
        assert retry.state.is_completed() and retry.labels["prefect.worker.name"] == survivor
        assert retry.parameters["batches"] == killed_run.parameters["batches"]
        assert {r.labels["prefect.worker.name"] for r in runs if r.name.endswith("-of-2")} == {"w1", "w2"}
        assert Counter(r.labels["prefect.worker.name"] for r in runs if r.state.is_completed()) == {survivor: 2}
        assert len(runs) == 3

        # The database and the store: every variant exactly once, including the ones done before the kill.
        with db.session() as s:
            [run_row] = s.scalars(select(Run)).all()
            assert run_row.status == "completed" and run_row.counts["rendered"] == VARIANTS
            assert s.scalar(select(func.count(Variant.id)).where(Variant.status == "done")) == VARIANTS
            per_variant = Counter(s.scalars(select(Asset.variant_id)))
            assert len(per_variant) == VARIANTS and max(per_variant.values()) == 1
            stored = Counter(s.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "asset.stored")))
            assert len(stored) == VARIANTS and max(stored.values()) == 1
            keys = sorted(s.scalars(select(Asset.storage_key)))
        assert sorted(open_store(store_url).list()) == keys
        assert 0 < done_before_kill < len(killed_ids) == assets_among(killed_ids)
        db.dispose()
        client.__exit__(None, None, None)
    finally:
        procs.stop_all()
    if backends.kind == "sqlite":
        print("note: PostgreSQL unavailable; the Prefect server and the adforge database ran on SQLite")

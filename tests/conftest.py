from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from engine.random_checkpoint import write_random_sd1
from tests.helpers import POSTGRES_URL

if TYPE_CHECKING:
    from engine.pipeline import Pipeline


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is faster (no OpenMP workers spinning against
    # other processes), and results do not depend on how many cores CI happens to have.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    # Session- and module-scoped fixtures load (and so hash) checkpoints too: keep that cache out of $HOME.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hash cache must not leak between tests or into the developer's home.
    monkeypatch.setenv("ADFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_random_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors", seed=0))


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_random_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1-inpainting.safetensors", seed=1, inpaint=True))


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> Pipeline:
    """A float32 CPU pipeline on ``tiny_checkpoint``, one per test module."""
    from engine.pipeline import Pipeline

    return Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def nc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose metadata declares a non-commercial licence (CC BY-NC-SA) and a title, "NC Model"."""
    return Path(write_random_sd1(
        tmp_path_factory.mktemp("lic") / "nc-model.safetensors", seed=11,
        metadata={"modelspec.license": "CC-BY-NC-SA-4.0", "modelspec.title": "NC Model"},
    ))


# ------------------------------------------------------------------------------------------------ services


def _service_missing(what: str) -> None:
    # CI guarantees the services: there a missing one is a failure, not a skip that hides untested code.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def service_missing():
    """``_service_missing`` for test modules (a conftest cannot be imported): skip locally, fail under CI."""
    return _service_missing


@pytest.fixture(scope="session")
def postgres_server() -> str:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # driver missing, server down, auth refused
        _service_missing(f"PostgreSQL at {POSTGRES_URL} ({type(exc).__name__}: {exc})")
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in postgres_server else "?"
    try:
        yield f"{postgres_server}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    from storage.database import sqlite_url

    return sqlite_url(tmp_path / "adforge.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every database test runs on both backends."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_db_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API over HTTP on 127.0.0.1 (moto's threaded server), with fake credentials."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # pragma: no cover - depends on the environment
        _service_missing(f"moto[server] for a loopback S3 endpoint ({e})")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"adforge-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------------------------------------ campaign runs


@pytest.fixture(scope="session")
def campaign_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD1 checkpoint that declares a 64 px native size and a commercial licence, so campaign tests
    generate 64 px images (fast) and commercial rows may use it."""
    return Path(write_random_sd1(
        tmp_path_factory.mktemp("models") / "campaign-tiny.safetensors", seed=3,
        metadata={"adforge.native_size": "64", "modelspec.license": "Apache-2.0", "modelspec.title": "campaign-tiny"},
    ))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One temporary Prefect API server for the whole session (starting one costs ~10 s); yields its URL,
    which subprocesses (the kill -9 test) get as PREFECT_API_URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def db(db_url: str):
    """An opened, migrated database on each backend."""
    from storage.database import open_database

    database = open_database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def campaign_caches(prefect_harness: str) -> Iterator[None]:
    """Campaign runs keep database engines, store clients and loaded models per process; drop them after each
    test so that tests do not share state (the Prefect server itself is shared by the session)."""
    yield
    from flows.campaign import close_resources
    from flows.rendering import clear_pipelines

    close_resources()
    clear_pipelines()


@pytest.fixture(scope="session")
def channels():
    """The project's channel formats (templates/channels.yaml)."""
    from flows.channels import load_channels

    return load_channels()


@pytest.fixture(scope="session")
def styles():
    """The project's style presets (templates/styles.yaml)."""
    from flows.styles import load_styles

    return load_styles()


# ------------------------------------------------------------------------------------------------ review


@pytest.fixture(scope="module")
def cheap_password_hashes() -> Iterator[None]:
    """For modules that add users and sign them in (``pytestmark = pytest.mark.usefixtures(...)``): argon2's default
    cost is ~0.25 s per hash on a 2-core machine; these tests check logic, not hash strength."""
    from argon2 import PasswordHasher

    import review.auth

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(review.auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        review.auth._dummy_hash.cache_clear()
        yield
    review.auth._dummy_hash.cache_clear()

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_sd1


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hash cache must not leak between tests or into the developer's home.
    monkeypatch.setenv("ADFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1-inpainting.safetensors", seed=1, inpaint=True)

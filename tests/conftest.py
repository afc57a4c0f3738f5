from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.random_checkpoint import write_random_sd1


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

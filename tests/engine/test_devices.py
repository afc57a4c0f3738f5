"""Threads from the free cores, and who decides them."""

from __future__ import annotations

import pytest
import torch

from engine.devices import THREAD_ENV, free_cpu_threads, set_cpu_threads


@pytest.mark.parametrize("load, cores, threads", [(0.0, 8, 8), (3.4, 8, 5), (3.6, 8, 4), (20.0, 2, 1), (0.4, 2, 2)])
def test_free_threads_are_the_cores_less_the_load(load: float, cores: int, threads: int) -> None:
    assert free_cpu_threads(load=load, cores=cores) == threads


@pytest.fixture
def torch_threads(monkeypatch):
    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_environment_decides_first(torch_threads, monkeypatch) -> None:
    monkeypatch.setenv("ADFORGE_THREADS", "1")
    assert set_cpu_threads() == 1 == torch.get_num_threads()
    monkeypatch.delenv("ADFORGE_THREADS")
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_cpu_threads() == 2  # the user's OpenMP setting stands


def test_without_a_say_the_free_cores(torch_threads, monkeypatch) -> None:
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))
    assert set_cpu_threads() == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert set_cpu_threads() == min(torch.get_num_threads(), free_cpu_threads(load=0.0)) == free_cpu_threads(load=0.0)
    assert set_cpu_threads(1) == 1


def test_a_bad_thread_count_is_said_and_ignored(torch_threads, monkeypatch, caplog) -> None:
    monkeypatch.setenv("ADFORGE_THREADS", "lots")
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))
    assert set_cpu_threads() == 1  # the free cores, not the unreadable setting
    assert "ADFORGE_THREADS='lots' is not a positive whole number" in caplog.text

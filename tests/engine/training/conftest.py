"""Fixtures shared by the brand trainers' tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.loading import load_checkpoint


@pytest.fixture(scope="module")
def models(tiny_checkpoint: Path):
    """The tiny random SD 1.x models, loaded once per test module (trainers that change them load their own)."""
    return load_checkpoint(tiny_checkpoint)

"""SD 2.x and SDXL files in the model registry: their family and the native size channels are planned at."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from engine.random_checkpoint import write_random
from flows.model_registry import describe_model


def _without_native_size(path: Path) -> Path:
    """The file as a downloaded one is: no adforge metadata saying its size."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "adforge.native_size"}
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("family, registered, native", [
    ("sd2", "sd2", 512), ("sd2-v", "sd2", 768), ("sdxl", "sdxl", 1024),
])
def test_family_and_native_size_of_sd2_and_sdxl_files(tmp_path: Path, family: str, registered: str, native: int) -> None:
    path = _without_native_size(Path(write_random(tmp_path / f"{family}.safetensors", family)))
    info = describe_model(path)
    assert (info.family, info.kind, info.native_size) == (registered, "checkpoint", native)

"""Where the bundled demo model lives, so the project renders out of the box with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "adforge-demo.safetensors"


def bundled_model_path() -> Path:
    """``models/adforge-demo.safetensors`` at the repository root (the package is installed editable)."""
    return Path(__file__).resolve().parent.parent / "models" / BUNDLED_MODEL_NAME

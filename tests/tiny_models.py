"""Tiny random models in the real single-file SD 1.x checkpoint layout (see engine/random_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from engine.random_checkpoint import TINY_TEXT, TINY_UNET, TINY_VAE, random_sd1_state_dict, randomize_, sd1_metadata, write_random_sd1

__all__ = ["TINY_TEXT", "TINY_UNET", "TINY_VAE", "tiny_sd1_state_dict", "tiny_metadata", "write_tiny_sd1", "_randomize"]

_randomize = randomize_
tiny_sd1_state_dict = random_sd1_state_dict
tiny_metadata = sd1_metadata


def write_tiny_sd1(path: Path, seed: int = 0, *, inpaint: bool = False, **kw) -> Path:
    write_random_sd1(path, "tiny", seed=seed, inpaint=inpaint, **kw)
    return Path(path)

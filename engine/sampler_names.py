"""The samplers' names: A1111's display names (what users type and what the infotext records), their aliases, and
which function and schedule each name stands for. Kept free of torch so that a process that only checks names
(the gallery's re-render queue) does not load the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SAMPLERS", "SamplerSpec", "get_sampler"]


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111 display name, exactly as A1111 writes it into infotext
    method: str  # the sampler function: "euler" | "euler_ancestral" | "dpmpp_2m" | "ddim"
    schedule: str  # "default" | "karras" | "ddim"
    ancestral: bool  # needs fresh noise per step


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("Euler", "euler", "default", False),
        SamplerSpec("Euler a", "euler_ancestral", "default", True),
        SamplerSpec("DPM++ 2M", "dpmpp_2m", "default", False),
        SamplerSpec("DPM++ 2M Karras", "dpmpp_2m", "karras", False),
        SamplerSpec("DDIM", "ddim", "ddim", False),
    )
}


def _fold(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp_2m_karras", "dpm++-2m karras" all fold to "dpmpp2mkarras".
    return re.sub(r"[\s_\-]+", "", name.strip().lower().replace("++", "pp"))


_LOOKUP: dict[str, str] = {_fold(n): n for n in SAMPLERS}
# Spelled-out alias that does not fold onto a display name.
_LOOKUP["eulerancestral"] = "Euler a"


def _lookup_key(name: str) -> str:
    key = _fold(name)
    # k-diffusion / older A1111 API names carry a "k_" prefix ("k_euler_a", "k_dpmpp_2m").
    if key not in _LOOKUP and key.startswith("k") and key[1:] in _LOOKUP:
        key = key[1:]
    return key


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by A1111 display name, case-insensitively, or by a simple alias
    ("euler_a", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "k_euler", "ddim")."""
    if not isinstance(name, str):
        raise ValueError(f"sampler name must be a string, got {name!r}")
    key = _lookup_key(name)
    if key not in _LOOKUP:
        valid = ", ".join(repr(n) for n in SAMPLERS)
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {valid}")
    return SAMPLERS[_LOOKUP[key]]

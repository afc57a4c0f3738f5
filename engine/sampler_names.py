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
    method: str  # the sampler function: "euler" | "euler_ancestral" | "dpmpp_2m" | "ddim" | "lcm"
    schedule: str  # "default" | "karras" | "ddim" | "sgm_uniform" | "turbo" | "lcm"
    ancestral: bool  # needs fresh noise per step


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("Euler", "euler", "default", False),
        SamplerSpec("Euler a", "euler_ancestral", "default", True),
        SamplerSpec("DPM++ 2M", "dpmpp_2m", "default", False),
        SamplerSpec("DPM++ 2M Karras", "dpmpp_2m", "karras", False),
        SamplerSpec("DDIM", "ddim", "ddim", False),
        # Few-step models. "LCM" is A1111's name (since 1.7); the rest are Forge's combined sampler + scheduler
        # names, spelled as Forge writes them into infotext ("Euler A Turbo", "... SGMUniform"); A1111 >= 1.9
        # and ComfyUI offer the same schedules as a separate choice ("SGM Uniform" / "sgm_uniform").
        # SD-Turbo / SDXL-Turbo: "Euler A Turbo" (= diffusers EulerAncestral, timestep_spacing="trailing"),
        # 1-4 steps, CFG 1. LCM-distilled models / LCM-LoRA: "LCM", 2-8 steps, CFG 1-2.
        SamplerSpec("LCM", "lcm", "lcm", True),
        SamplerSpec("LCM Karras", "lcm", "karras", True),
        SamplerSpec("Euler A Turbo", "euler_ancestral", "turbo", True),
        SamplerSpec("DPM++ 2M Turbo", "dpmpp_2m", "turbo", False),
        SamplerSpec("Euler SGMUniform", "euler", "sgm_uniform", False),
        SamplerSpec("Euler A SGMUniform", "euler_ancestral", "sgm_uniform", True),
        SamplerSpec("DPM++ 2M SGMUniform", "dpmpp_2m", "sgm_uniform", False),
    )
}


def _fold(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp_2m_karras", "dpm++-2m karras" all fold to "dpmpp2mkarras".
    return re.sub(r"[\s_\-]+", "", name.strip().lower().replace("++", "pp"))


_LOOKUP: dict[str, str] = {_fold(n): n for n in SAMPLERS}
# Spelled-out aliases that do not fold onto a display name (the ancestral ones are Forge's own aliases).
_LOOKUP["eulerancestral"] = "Euler a"
_LOOKUP["eulerancestralturbo"] = "Euler A Turbo"
_LOOKUP["eulerancestralsgmuniform"] = "Euler A SGMUniform"
# "SGM Uniform" as A1111 >= 1.9 spells the schedule: "Euler a SGM Uniform" already folds onto
# "eulerasgmuniform"; nothing more is needed for it.


def _lookup_key(name: str) -> str:
    key = _fold(name)
    # k-diffusion / older A1111 API names carry a "k_" prefix ("k_euler_a", "k_dpmpp_2m").
    if key not in _LOOKUP and key.startswith("k") and key[1:] in _LOOKUP:
        key = key[1:]
    return key


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by A1111 / Forge display name, case-insensitively, ignoring spaces, "_" and "-"
    ("Euler a SGM Uniform" is "Euler A SGMUniform"), or by a simple alias ("euler_a", "euler_ancestral",
    "dpmpp_2m", "dpmpp_2m_karras", "k_euler", "ddim", "k_lcm", "euler_ancestral_turbo")."""
    if not isinstance(name, str):
        raise ValueError(f"sampler name must be a string, got {name!r}")
    key = _lookup_key(name)
    if key not in _LOOKUP:
        valid = ", ".join(repr(n) for n in SAMPLERS)
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {valid}")
    return SAMPLERS[_LOOKUP[key]]

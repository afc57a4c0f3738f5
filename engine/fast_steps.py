"""The state a fast mode (engine.fast_modes) keeps over one sampling run, and what it tells each U-Net call.

:class:`FastSteps` lives as long as one denoiser (one batch's sampling). Each new sigma is a new model evaluation:
with ``cache:N``, evaluations 0, N, 2N ... run the whole U-Net and keep the features entering its shallow output
blocks; the others run only the shallow branch over those features (DeepCache's uniform schedule). The features
are kept per *site*: the rows of one image (the CPU runs images one at a time) and, for tiled denoising, one tile,
so every part of the picture reuses its own. With ``tome:R``, every call gets a :class:`~engine.token_merge.TokenMerge`
seeded with the evaluation's number, so a request's pixels do not depend on what else was in its batch.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from engine.fast_modes import FastMode
from engine.token_merge import TokenMerge

__all__ = ["FastCall", "FastSteps"]


@dataclass
class FastCall:
    """What one U-Net call does differently. ``branch`` None: no feature reuse. ``kept`` set: a shallow call over
    these features; ``kept`` None with a branch: a full call that stores the features in ``stored``."""

    branch: int | None = None
    kept: torch.Tensor | None = None
    tome: TokenMerge | None = None
    stored: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shallow(self) -> bool:
        return self.kept is not None


class FastSteps:
    def __init__(self, mode: FastMode, n_blocks: int) -> None:
        if mode.caches and mode.cache_branch > n_blocks - 2:
            raise ValueError(f"fast mode {mode}: cache branch {mode.cache_branch} needs a U-Net of more than "
                             f"{mode.cache_branch + 1} input blocks; this one has {n_blocks}")
        self.mode = mode
        self.evaluation = -1
        self._sigma: float | None = None
        self._kept: dict[Hashable, torch.Tensor] = {}
        self.full_calls = self.shallow_calls = 0

    def step(self, sigma: torch.Tensor) -> None:
        """Called by the denoiser with each evaluation's sigma; tiles of one evaluation share it."""
        value = float(sigma.flatten()[0])
        if value != self._sigma:
            self._sigma = value
            self.evaluation += 1

    def call(self, site: Hashable) -> FastCall:
        mode = self.mode
        tome = TokenMerge(mode.tome_ratio, seed=self.evaluation) if mode.merges else None
        if not mode.caches:
            return FastCall(tome=tome)
        kept = None if self.evaluation % mode.cache_interval == 0 else self._kept.get(site)
        if kept is None:
            self.full_calls += 1
        else:
            self.shallow_calls += 1
        return FastCall(branch=mode.cache_branch, kept=kept, tome=tome)

    def done(self, site: Hashable, call: FastCall) -> None:
        if call.stored is not None:
            self._kept[site] = call.stored

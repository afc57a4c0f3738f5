"""ControlNets inside a pipeline: each file loaded once, and per sampling step the summed residuals for the U-Net.

The schedule of a control follows diffusers (StableDiffusionControlNetPipeline): of ``n`` sampling steps, step ``i``
is steered when neither ``i / n < start`` nor ``(i + 1) / n > end``. The ControlNet sees what the U-Net sees at that
step: the scaled latent (its first channels: an inpainting U-Net's mask and masked image are not for it), the
timestep, the text context and SDXL's ``y``, for the cond and the uncond rows alike (no "guess mode"); the hint is the
control image in [0, 1] at pixel size, the same for every row of the batch (it is part of the batch key). Residuals
are multiplied by the control's strength and summed over the controls.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.adapters.refs import AdapterFile
from engine.checkpoint import CheckpointError, file_sha256
from engine.controlnet import ControlNetModel
from engine.controlnet_loading import LoadedControlNet, load_controlnet
from engine.image_ops import cover_fit, pil_to_tensor01
from engine.loading import LoadedModels
from engine.requests import ControlUse, GenerationRequest

__all__ = ["ControlNetCache", "ControlSteps", "Residuals"]

# (x rows, timesteps, context, y) -> one residual per U-Net skip, then the middle's
Residuals = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], list[torch.Tensor]]
# A ControlNet is a U-Net's first half (~1.4 GB for SD 1.5 in float32): a worker keeps only a few.
MAX_CACHED = 4


def _fmt(value: float) -> str:
    return f"{value:g}"


@dataclass
class _Active:
    net: ControlNetModel
    hint: torch.Tensor  # (1, 3, H, W) in [0, 1], the network's dtype
    strength: float
    start: float
    end: float


class ControlSteps:
    """The controls of one batch over its ``sigmas`` (the schedule the sampler runs, final 0 included)."""

    def __init__(self, active: list[_Active], sigmas: torch.Tensor):
        self.active = active
        self.sigmas = sigmas.double().cpu()
        self.n = len(sigmas) - 1

    def step_index(self, sigma: float) -> int:
        """The step whose interval holds ``sigma``: its start for one-evaluation samplers, and the same step for a
        second-order sampler's evaluation between two sigmas."""
        above = int((self.sigmas[: self.n] >= sigma * (1 - 1e-5)).sum())
        return min(max(above - 1, 0), self.n - 1)

    def at(self, sigma: torch.Tensor) -> Residuals | None:
        """The residual function for the step at ``sigma`` (every row of a batch is at the same sigma); None when no
        control acts on it."""
        i, n = self.step_index(float(sigma.reshape(-1)[0])), self.n
        live = [c for c in self.active if c.strength != 0 and not (i / n < c.start or (i + 1) / n > c.end)]
        if not live:
            return None

        def residuals(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> list[torch.Tensor]:
            total: list[torch.Tensor] | None = None
            for c in live:
                hint = c.hint.expand(x.shape[0], -1, -1, -1)
                out = [r * c.strength for r in c.net(x[:, : c.net.config.in_channels], hint, t, context, y)]
                total = out if total is None else [a + b for a, b in zip(total, out)]
            assert total is not None
            return total

        return residuals


class ControlNetCache:
    """The ControlNets a pipeline has loaded, by (absolute path, sha256): each file is read once per pipeline."""

    def __init__(self, models: LoadedModels, vae_factor: int, allow_pickle: bool = False):
        self.models = models
        self.vae_factor = vae_factor
        self.allow_pickle = allow_pickle
        self._loaded: dict[tuple[str, str], LoadedControlNet] = {}

    def load(self, file: AdapterFile) -> LoadedControlNet:
        """The ControlNet of ``file`` in the pipeline's device and dtype. CheckpointError (naming the
        file) if it is no ControlNet, does not fit the model, or is not the file its recorded sha256 says."""
        path = os.path.abspath(file.path)
        if not os.path.isfile(path):
            raise CheckpointError(file.path, "ControlNet file not found")
        digest = file_sha256(path)
        if file.sha256 is not None and file.sha256 != digest:
            raise CheckpointError(file.path, f"the file changed since it was recorded: sha256 {digest[:12]}..., "
                                             f"expected {file.sha256[:12]}...")
        key = (path, digest)
        if key not in self._loaded:
            if len(self._loaded) >= MAX_CACHED:
                self._loaded.pop(next(iter(self._loaded)))
            m = self.models
            self._loaded[key] = load_controlnet(path, m.unet.config, m.family.label, vae_factor=self.vae_factor,
                                                device=m.device, dtype=m.dtype, allow_pickle=self.allow_pickle,
                                                sha256=digest)
        return self._loaded[key]

    def steps(self, req: GenerationRequest, sigmas: torch.Tensor) -> ControlSteps | None:
        """The controls of ``req`` (and of every request batched with it: they share the key) over ``sigmas``."""
        if not req.controls:
            return None
        m = self.models
        active = []
        for use in req.controls:
            net = self.load(use.model).model
            image = cover_fit(use.image.convert("RGB"), req.width, req.height)
            hint = pil_to_tensor01(image)[None].to(device=m.device, dtype=net.dtype)
            active.append(_Active(net, hint, float(use.strength), float(use.start), float(use.end)))
        return ControlSteps(active, sigmas)

    def parameters(self, controls: Sequence[ControlUse]) -> dict[str, str]:
        """A1111 ControlNet-extension infotext entries: "ControlNet 0": "Module: canny, Model: name [hash8], ..."."""
        out: dict[str, str] = {}
        for i, use in enumerate(controls):
            sha = use.model.sha256 or file_sha256(use.model.path)
            out[f"ControlNet {i}"] = (f"Module: {use.kind}, Model: {use.model.name} [{sha[:8]}], Weight: {_fmt(use.strength)}, "
                                      f"Resize Mode: Crop and Resize, Guidance Start: {_fmt(use.start)}, "
                                      f"Guidance End: {_fmt(use.end)}")
        return out

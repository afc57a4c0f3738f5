"""Out-of-memory on a batch: halve it and retry, never fail the run for it.

A batch that does not fit on its device (a 16-image batch on a smaller GPU, a large channel size, memory held
by another process) raises ``torch.OutOfMemoryError``. :class:`OomHalvingPipeline` wraps a loaded pipeline: on
that error it frees what the failed attempt held, halves the number of images per engine call, logs it and
renders the same requests again in the smaller pieces. The smaller size then stays for that pipeline (this
process, this device), so later batches do not hit the same wall first. Only a single image that still does
not fit is an error, and that is recorded against its variants like any engine failure.

Results do not depend on the split: every image has its own seeded generator (see DESIGN.md, "Seeds").

The logic is device-agnostic; ``torch.OutOfMemoryError`` is what the CUDA caching allocator raises. CPU
allocators report exhaustion differently (and rarely), so for tests on CPU there is a hook:
``ADFORGE_TEST_UNET_LATENT_CAP=N`` makes the U-Net raise a real ``torch.OutOfMemoryError`` for any call on
more than N latents (a CFG pair of one image is 2), as a device that holds only N would.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref
from collections.abc import Sequence

import torch

from engine.pipeline import GenerationRequest, GenerationResult, Pipeline

__all__ = ["TEST_LATENT_CAP_ENV", "OomHalvingPipeline", "install_latent_cap", "oom_safe"]

log = logging.getLogger(__name__)
TEST_LATENT_CAP_ENV = "ADFORGE_TEST_UNET_LATENT_CAP"

_WRAPPERS: "weakref.WeakKeyDictionary[Pipeline, OomHalvingPipeline]" = weakref.WeakKeyDictionary()


class OomHalvingPipeline:
    """``generate`` of the wrapped pipeline, with halving on out-of-memory. ``max_batch_size`` is the wrapped
    pipeline's (callers use it to size the batches they record); ``limit`` is what currently fits per call."""

    def __init__(self, pipeline: Pipeline, name: str | None = None):
        self.pipeline = pipeline
        self.name = name or str(pipeline.device)
        self.limit: int | None = None  # None: no out-of-memory seen yet
        self.halvings = 0

    @property
    def max_batch_size(self) -> int:
        return self.pipeline.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.pipeline.max_batch_size = value

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def __getattr__(self, name: str):
        # Everything else (models, dtype, schedule, ...) is the wrapped pipeline's: callers that use more than
        # ``generate`` (the hires fix of an upscale chain) see the pipeline they expect.
        if name == "pipeline":  # not set yet (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def generate(self, requests: Sequence[GenerationRequest], progress=None) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        i = 0
        while i < len(requests):
            size = min(self.limit or len(requests), len(requests) - i)
            chunk = list(requests[i : i + size])
            try:
                results.extend(self.pipeline.generate(chunk, progress))
                i += size
                continue
            except torch.OutOfMemoryError as exc:
                if size == 1:
                    raise
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # Retry outside the except block: the exception's traceback holds the failed attempt's frames and,
            # through them, its tensors; only once it is gone can the memory be returned.
            self._free()
            self.limit = max(1, size // 2)
            self.halvings += 1
            log.warning("out of memory on %s rendering %d image(s) in one call (%s); halving to %d and retrying",
                        self.name, size, message, self.limit)
        return results

    def _free(self) -> None:
        gc.collect()
        if self.pipeline.device.type == "cuda":
            torch.cuda.empty_cache()


def oom_safe(pipeline: Pipeline, name: str | None = None) -> OomHalvingPipeline:
    """The one wrapper of ``pipeline`` in this process, so what was learned about its memory is kept. Installs
    the test hook's cap when :data:`TEST_LATENT_CAP_ENV` is set."""
    wrapper = _WRAPPERS.get(pipeline)
    if wrapper is None:
        wrapper = _WRAPPERS[pipeline] = OomHalvingPipeline(pipeline, name)
        cap = os.environ.get(TEST_LATENT_CAP_ENV)
        if cap:
            install_latent_cap(pipeline, int(cap))
    return wrapper


def install_latent_cap(pipeline: Pipeline, cap: int) -> torch.utils.hooks.RemovableHandle:
    """Test hook: the U-Net raises ``torch.OutOfMemoryError`` for a call on more than ``cap`` latents, at the
    point where a device without room for them would fail (before the call's activations exist)."""
    unet = pipeline.models.unet

    def check(_module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        if x.shape[0] > cap:
            need = x.shape[0] * x[0].numel() * x.element_size()
            raise torch.OutOfMemoryError(
                f"{TEST_LATENT_CAP_ENV}={cap}: out of memory for a U-Net call on {x.shape[0]} latents "
                f"({need} bytes of input on {x.device}); this device holds {cap}")

    return unet.register_forward_pre_hook(check)

"""Helpers shared by the test packages (fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle


def cap_unet_latents(cap: int, unet: torch.nn.Module | None = None) -> RemovableHandle:
    """A device that holds only ``cap`` latents per U-Net call: the U-Net raises a real ``torch.OutOfMemoryError``
    for a bigger call, at the point where such a device would fail (before the call's activations exist). On
    ``unet``, or on every U-Net of this process (a render worker's ``worker_init``, before it loads a model)."""
    from engine.unet import UNetModel

    def check(module: torch.nn.Module, args: tuple) -> None:
        if not isinstance(module, UNetModel):
            return
        x = args[0]
        if x.shape[0] > cap:
            need = x.shape[0] * x[0].numel() * x.element_size()
            raise torch.OutOfMemoryError(
                f"latent cap {cap}: out of memory for a U-Net call on {x.shape[0]} latents "
                f"({need} bytes of input on {x.device}); this device holds {cap}")

    if unet is not None:
        return unet.register_forward_pre_hook(check)
    return torch.nn.modules.module.register_module_forward_pre_hook(check)

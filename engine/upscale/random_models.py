"""Random-weight super-resolution files in the real layouts, for tests and benchmarks (nothing is downloaded).

The networks are spandrel's own architecture classes, so the files carry exactly the tensor names and shapes
that ``RealESRGAN_x4plus.pth`` (ESRGAN / RRDBNet) or ``realesr-general-x4v3.pth`` (Real-ESRGAN Compact) carry,
only smaller; they load through the same path as a user's file. The pictures they make are noise by design.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["random_compact", "random_esrgan", "write_upscaler"]


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled normal weights from a seeded generator (deterministic file bytes), zero biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # PReLU slopes
                p.fill_(0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p[0].numel(), 1)) ** 0.5)


def random_esrgan(*, num_filters: int = 8, num_blocks: int = 1, scale: int = 4, seed: int = 0) -> torch.nn.Module:
    """An ESRGAN (RRDBNet, old-arch keys ``model.N...``) with random weights whose output sits mid-range:
    the last convolution's bias is 0.5, so tiled-vs-untiled comparisons do not happen on clamped zeros."""
    from spandrel.architectures.ESRGAN import ESRGAN

    net = ESRGAN(num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    _randomize_(net, seed)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(0.2)
        last.bias.fill_(0.5)  # type: ignore[union-attr]
    return net


def random_compact(*, num_feat: int = 8, num_conv: int = 2, scale: int = 2, seed: int = 0) -> torch.nn.Module:
    """A Real-ESRGAN Compact (SRVGGNetCompact) with random weights: nearest upsampling plus a small random residual."""
    from spandrel.architectures.Compact import Compact

    net = Compact(num_feat=num_feat, num_conv=num_conv, upscale=scale)
    _randomize_(net, seed)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(0.2)  # a residual of a few levels, as a trained model adds: outputs are not clamped flat
    return net


def write_upscaler(net: torch.nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Save ``net``'s state dict as ``.safetensors`` (with ``metadata``) or ``.pth`` (a plain tensor dict, as
    upscaler files are published)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    if p.suffix.lower() in (".safetensors", ".sft"):
        save_file(sd, str(p), metadata=metadata)
    elif p.suffix.lower() in (".pth", ".pt"):
        if metadata:
            raise ValueError(".pth files carry no metadata; use .safetensors")
        torch.save(sd, p)
    else:
        raise ValueError(f"{p}: write .safetensors or .pth")
    return p

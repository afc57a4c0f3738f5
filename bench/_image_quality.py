"""How far an image is from a reference render of the same seed: PSNR and SSIM, for the speed benches' quality
columns (bench/engine_vs_diffusers.py, bench/fast_modes.py). Inputs are float tensors in [0, 1], [3, H, W] or
[B, 3, H, W]; PIL images go through :func:`to_tensor`."""

from __future__ import annotations

import math

__all__ = ["psnr", "ssim", "to_tensor"]


def to_tensor(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (peak 1.0); inf for identical images."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a, b, window: int = 7) -> float:
    """Mean structural similarity of the luma (ITU-R BT.601 weights) with a uniform ``window`` x ``window`` window
    and the standard constants (K1 0.01, K2 0.03, data range 1): 1.0 for identical images."""
    import torch
    import torch.nn.functional as F

    def luma(x):
        x = x.double()
        if x.dim() == 3:
            x = x[None]
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)[None, :, None, None]
        return (x * w).sum(dim=1, keepdim=True)

    x, y = luma(a), luma(b)
    c1, c2 = 0.01**2, 0.03**2

    def mean(t):
        return F.avg_pool2d(t, window, stride=1)

    mx, my = mean(x), mean(y)
    vx = mean(x * x) - mx * mx
    vy = mean(y * y) - my * my
    cov = mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())

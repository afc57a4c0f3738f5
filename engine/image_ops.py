"""Pixel-side helpers: tensors <-> PIL, masks, and the outpainting canvas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

SIDES = ("left", "right", "top", "bottom")
_SIDE_ALIASES = {"up": "top", "down": "bottom"}


def pil_to_tensor01(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; alpha is dropped (composited on nothing: alpha is not our input)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor01_to_pil(t: torch.Tensor) -> Image.Image:
    arr = (t.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def mask_to_tensor(mask: Image.Image, size: tuple[int, int], blur: int = 0) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1], 1 = repaint; white (or any bright) pixels mark the area to repaint."""
    m = mask.convert("L")
    if m.size != size:
        m = m.resize(size, Image.Resampling.LANCZOS)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]


def latent_mask(mask01: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) -> latent mask (B, 1, H/f, W/f): a latent cell is repainted if any of its
    pixels is, so the repainted region never shrinks below what the user painted."""
    return F.max_pool2d(mask01, kernel_size=factor, stride=factor)


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly ``size`` (width, height); callers choose the size, we do not guess a crop."""
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Outpaint:
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Outpaint":
        """``left:128`` or ``left:128,top:64`` (``up``/``down`` accepted for top/bottom)."""
        amounts: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            side, sep, value = part.partition(":")
            side = _SIDE_ALIASES.get(side.strip().lower(), side.strip().lower())
            if not sep or side not in SIDES:
                raise ValueError(f"outpaint {part!r}: expected SIDE:PIXELS with SIDE one of {', '.join(SIDES)}")
            try:
                px = int(value)
            except ValueError:
                raise ValueError(f"outpaint {part!r}: {value!r} is not a whole number of pixels") from None
            if px <= 0:
                raise ValueError(f"outpaint {part!r}: pixels must be positive")
            amounts[side] = amounts.get(side, 0) + px
        if not amounts:
            raise ValueError("outpaint: nothing to extend (e.g. left:128)")
        return cls(**amounts)

    def rounded(self, size: tuple[int, int], multiple: int = 8) -> "Outpaint":
        """Grow the right/bottom padding so the canvas is a multiple of ``multiple`` (the VAE's factor)."""
        w = size[0] + self.left + self.right
        h = size[1] + self.top + self.bottom
        return Outpaint(self.left, self.right + (-w) % multiple, self.top, self.bottom + (-h) % multiple)


def outpaint_canvas(image: Image.Image, pad: Outpaint, overlap: int = 16) -> tuple[Image.Image, Image.Image]:
    """Extend ``image`` by ``pad``: new area filled by stretching the edge pixels (a neutral start that keeps
    colours continuous), and a mask that is white over the new area plus ``overlap`` pixels into the old one,
    so the seam is repainted too."""
    src = np.asarray(image.convert("RGB"))
    h, w = src.shape[:2]
    canvas = np.pad(src, ((pad.top, pad.bottom), (pad.left, pad.right), (0, 0)), mode="edge")
    canvas_img = Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(2))
    # Keep the original pixels sharp; only the stretched margin is smoothed.
    canvas_img.paste(image.convert("RGB"), (pad.left, pad.top))
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    keep_t = pad.top + (overlap if pad.top else 0)
    keep_b = pad.top + h - (overlap if pad.bottom else 0)
    keep_l = pad.left + (overlap if pad.left else 0)
    keep_r = pad.left + w - (overlap if pad.right else 0)
    if keep_b > keep_t and keep_r > keep_l:
        mask[keep_t:keep_b, keep_l:keep_r] = 0
    return canvas_img, Image.fromarray(mask, "L")


def cover_fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale (Lanczos) to cover ``width`` x ``height``, then crop the centre: exact size, no distortion, no bars.
    An image already at that size is returned as it is (no resampling blur)."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))

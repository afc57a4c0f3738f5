"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's first half that steers it with an image.

Module names are those of the LDM ControlNet checkpoint (lllyasviel's ``cldm.py``) with ``control_model.`` stripped,
so a file loads with no renaming table: ``time_embed``, ``label_emb`` (SDXL), ``input_blocks`` and ``middle_block``
(built by the same code as the U-Net's, :func:`engine.unet.build_encoder`), ``input_hint_block`` (the image encoder),
``zero_convs.N.0`` (a 1x1 conv per input block) and ``middle_block_out.0``.

The hint (RGB in [0, 1] at pixel size) goes through the hint block down to latent size and is added to the output of
``input_blocks[0]``; each input block's output through its zero conv, and the middle block's through
``middle_block_out``, are the residuals the U-Net adds to its skip connections and middle output
(``UNetModel.forward(control=...)``).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.unet import UNetConfig, build_encoder, embed

__all__ = ["HINT_WIDTHS", "ControlNetModel", "hint_block_indices"]

# The hint encoder's widths in every published ControlNet: 3 -> 16, then 16 -> 32 -> 96 -> 256, each step a 3x3 conv
# keeping the width followed by a stride-2 3x3 conv changing it, then a conv to the U-Net's width.
HINT_WIDTHS = (16, 32, 96, 256)


def hint_block_indices(n_widths: int) -> list[int]:
    """Indices of the convs in ``input_hint_block`` (a Sequential with a SiLU between convs): 0, 2, ..., 4n - 2.
    Four widths give the checkpoint's 0, 2, 4, 6, 8, 10, 12, 14."""
    return [2 * k for k in range(2 * n_widths)]


class ControlNetModel(nn.Module):
    """``hint_widths``: the hint encoder's widths (len(widths) - 1 stride-2 convs: the published (16, 32, 96, 256)
    downsample 8x, matching a VAE of factor 8)."""

    def __init__(self, config: UNetConfig, hint_channels: int = 3, hint_widths: tuple[int, ...] = HINT_WIDTHS) -> None:
        super().__init__()
        if len(hint_widths) < 1:
            raise ValueError("the hint encoder needs at least one width")
        self.config = cfg = config
        self.hint_channels = hint_channels
        self.hint_widths = tuple(hint_widths)
        enc = build_encoder(cfg)
        self.time_embed, self.label_emb = enc.time_embed, enc.label_emb
        self.input_blocks = enc.input_blocks
        self.skip_channels = tuple(enc.skip_channels)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1)) for ch in enc.skip_channels)
        self.input_hint_block = _hint_block(hint_channels, self.hint_widths, cfg.model_channels)
        self.middle_block = enc.middle_block
        width = enc.skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def hint_factor(self) -> int:
        """How much smaller than the hint the latent is (the hint block's stride-2 convs)."""
        return 2 ** (len(self.hint_widths) - 1)

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the U-Net: one per input block, then the middle block's (``len(input_blocks) + 1``)."""
        dtype = self.dtype
        emb = embed(self, self.config, timesteps, y, x.shape[0], dtype)
        guided = self.input_hint_block(hint.to(dtype))
        if guided.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"the hint {tuple(hint.shape[-2:])} encodes to {tuple(guided.shape[-2:])} but the latent is "
                             f"{tuple(x.shape[-2:])}: the hint must be {self.hint_factor}x the latent's size")
        h = x.to(dtype)
        context = context.to(dtype)
        outs: list[torch.Tensor] = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs


def _hint_block(channels: int, widths: tuple[int, ...], out: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(w_in, w_in, 3, padding=1), nn.SiLU(), nn.Conv2d(w_in, w_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out, 3, padding=1))
    return nn.Sequential(*layers)

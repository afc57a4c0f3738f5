"""The SD 1.x latent-diffusion U-Net, with module names that mirror the LDM checkpoint layout.

A single-file checkpoint stores this network under ``model.diffusion_model.``; after stripping that
prefix, ``UNetModel(config).load_state_dict(sd)`` works with no renaming table. The attribute names
below (``input_blocks``, ``in_layers``, ``emb_layers``, ``transformer_blocks``, ``op`` ...) are those
key names, not a style choice.

The architecture is read from tensor shapes (:func:`unet_config_from_state_dict`), so a narrow model of
the same topology (the bundled demo model, the test checkpoints) loads through the same path as SD 1.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Head count is not recoverable from weight shapes; SD 1.x always uses 8 heads. Files of ours may override
# it through this safetensors metadata key (see engine/checkpoint.py).
SD1_NUM_HEADS = 8


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Indices of the resolution levels (0 = full latent resolution) whose blocks carry a SpatialTransformer.
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = SD1_NUM_HEADS
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, cosine half first as in LDM."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32: half-precision statistics over large maps lose too much."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def _norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int) -> None:
        super().__init__()
        self.heads = heads
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        context = x if context is None else context
        m = context.shape[1]
        # Three separate projections, as the checkpoint stores them: fusing them needs either a weight copy per
        # call or a cached fused copy (measured on SD 1.5 / CPU: no faster, ~150 MB more peak memory).
        q = self.to_q(x).view(b, n, h, c // h).transpose(1, 2)
        k = self.to_k(context).view(b, m, h, c // h).transpose(1, 2)
        v = self.to_v(context).view(b, m, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, use_linear: bool) -> None:
        super().__init__()
        self.use_linear = use_linear
        self.norm = _norm(channels, eps=1e-6)
        self.proj_in: nn.Module = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out: nn.Module = nn.Linear(channels, channels) if use_linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # contiguous(): the transposed view is channels-last in memory; left so, every following 3x3 conv would
        # re-layout its weights on each call (measured: ~20% of an SD 1.5 U-Net call on CPU).
        x = x.transpose(1, 2).reshape(b, c, hgt, wid).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Upsampling to the skip connection's size (not blindly x2) keeps odd latent sizes working.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.ModuleList):
    """One LDM block: a list whose members take (x), (x, emb) or (x, context) as their kind needs."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        emb_dim = cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention(ch: int) -> SpatialTransformer:
            heads = cfg.num_heads
            if ch % heads:
                raise ValueError(f"U-Net width {ch} is not divisible by {heads} attention heads")
            return SpatialTransformer(ch, heads, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_in_transformer)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential([ResBlock(ch, emb_dim, ch), attention(ch), ResBlock(ch, emb_dim, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` at (possibly fractional) ``timesteps`` given text ``context``."""
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        h = x.to(dtype)
        context = context.to(dtype)
        skips: list[torch.Tensor] = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            h = torch.cat([h, skip], dim=1)
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, upsample_size)
        return self.out(h)


def unet_config_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: int = SD1_NUM_HEADS) -> UNetConfig:
    """Read the architecture from the (prefix-stripped) tensors of an LDM U-Net.

    Raises KeyError naming the first tensor it needed and did not find.
    """

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(key)
        return sd[key]

    conv_in = need("input_blocks.0.0.weight")
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(need("out.2.weight").shape[0])

    # Walk the input blocks: ResBlocks give each level's width, Downsamples close a level.
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    mults: list[int] = []
    res_per_level: list[int] = []
    attention_levels: list[int] = []
    count = 0
    level_mult = 0
    for i in range(1, n_blocks):
        if f"input_blocks.{i}.0.op.weight" in sd:
            mults.append(level_mult)
            res_per_level.append(count)
            count = 0
            continue
        width = int(need(f"input_blocks.{i}.0.in_layers.2.weight").shape[0])
        if width % model_channels:
            raise ValueError(f"input_blocks.{i} width {width} is not a multiple of {model_channels}")
        level_mult = width // model_channels
        if count == 0 and f"input_blocks.{i}.1.proj_in.weight" in sd:
            attention_levels.append(len(mults))
        count += 1
    mults.append(level_mult)
    res_per_level.append(count)
    if len(set(res_per_level)) != 1:
        raise ValueError(f"uneven ResBlocks per level {res_per_level}: not an LDM U-Net")

    proj_in = next((sd[k] for k in sd if k.endswith(".proj_in.weight")), None)
    if proj_in is None:
        raise KeyError("middle_block.1.proj_in.weight")
    depth = 1 + max(
        int(k.split("transformer_blocks.")[1].split(".")[0]) for k in sd if k.startswith("middle_block.1.transformer_blocks.")
    )
    attn2 = need("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(mults),
        num_res_blocks=res_per_level[0],
        attention_levels=tuple(attention_levels),
        num_heads=num_heads,
        context_dim=int(attn2.shape[1]),
        transformer_depth=depth,
        use_linear_in_transformer=proj_in.ndim == 2,
    )

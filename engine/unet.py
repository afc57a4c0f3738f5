"""The latent-diffusion U-Net of SD 1.x, SD 2.x and SDXL, with module names that mirror the LDM checkpoint layout.

A single-file checkpoint stores this network under ``model.diffusion_model.``; after stripping that
prefix, ``UNetModel(config).load_state_dict(sd)`` works with no renaming table. The attribute names
(``input_blocks``, ``label_emb``, ``in_layers``, ``transformer_blocks``, ``op`` ...) are those key names, not a
style choice; the blocks themselves live in engine/unet_blocks.py.

The three generations differ only in data: SD 2.x sizes its attention heads by width (``num_head_channels``) and
projects with Linear layers; SDXL also varies the transformer depth per level (none at full resolution) and adds a
vector conditioning ``y`` (pooled text + size embedding) to the time embedding through ``label_emb``.

The architecture is read from tensor shapes (:func:`unet_config_from_state_dict`), so a narrow model of
the same topology (the bundled demo model, the test checkpoints) loads through the same path as SD 1.5.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from engine.fast_steps import FastCall
from engine.token_merge import TokenMerge
from engine.unet_blocks import Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, Upsample, group_norm

# Head count is not recoverable from weight shapes; SD 1.x always uses 8 heads. Files of ours may override
# it through this safetensors metadata key (see engine/checkpoint.py).
SD1_NUM_HEADS = 8


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's architecture.

    Transformer depths have two spellings, and a config always holds the shorter one that describes its network
    (``__post_init__`` rewrites it), so two configs are equal exactly when they build the same network:
    - uniform (SD 1.x, SD 2.x): ``transformer_depth`` at each of ``attention_levels`` and in the middle block;
      the two per-level fields are None.
    - per level (SDXL): ``transformer_depth_per_level`` (0 = no attention at that level) and
      ``transformer_depth_middle``; ``attention_levels`` is derived from it and ``transformer_depth`` is 1 (unused).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Indices of the resolution levels (0 = full latent resolution) whose blocks carry a SpatialTransformer; kept
    # sorted and within channel_mult, and derived from transformer_depth_per_level when that is given.
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = SD1_NUM_HEADS
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False
    # > 0: each attention block has channels // num_head_channels heads (SD 2.x, SDXL: 64) and num_heads is unused.
    num_head_channels: int = -1
    # Transformer depth at each level (SDXL base: (0, 2, 10)); None: transformer_depth at each attention level.
    transformer_depth_per_level: tuple[int, ...] | None = None
    # The middle block's depth (SDXL base: 10); None: transformer_depth, or in per-level form the largest level
    # depth (SDXL's middle is as deep as its deepest level).
    transformer_depth_middle: int | None = None
    # Width of the vector conditioning ``y`` added to the time embedding (SDXL base: 2816); None: no ``y``.
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        if self.transformer_depth_per_level is None:
            depths = _uniform_depths(self.attention_levels, self.transformer_depth, n)
            middle = self.transformer_depth if self.transformer_depth_middle is None else self.transformer_depth_middle
        else:
            depths = tuple(self.transformer_depth_per_level)
            if len(depths) != n:
                raise ValueError(f"transformer_depth_per_level {depths} names {len(depths)} levels, channel_mult {n}")
            middle = max(depths) if self.transformer_depth_middle is None else self.transformer_depth_middle
        if min(depths) < 0 or middle < 1:
            raise ValueError(f"transformer depths must be >= 0 per level and >= 1 in the middle: {depths}, {middle}")
        canonical: dict[str, object] = {"attention_levels": tuple(level for level, d in enumerate(depths) if d)}
        if {d for d in depths if d} <= {middle}:
            canonical.update(transformer_depth=middle, transformer_depth_per_level=None, transformer_depth_middle=None)
        else:
            canonical.update(transformer_depth=1, transformer_depth_per_level=depths, transformer_depth_middle=middle)
        for name, value in canonical.items():
            object.__setattr__(self, name, value)  # frozen: the only way to normalize

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def level_depths(self) -> tuple[int, ...]:
        """Transformer depth at each level, 0 where the level has no attention."""
        if self.transformer_depth_per_level is not None:
            return self.transformer_depth_per_level
        return _uniform_depths(self.attention_levels, self.transformer_depth, len(self.channel_mult))

    @property
    def middle_depth(self) -> int:
        return self.transformer_depth if self.transformer_depth_middle is None else self.transformer_depth_middle

    def heads(self, channels: int) -> int:
        """Attention heads of a block ``channels`` wide."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(f"U-Net width {channels} is not a multiple of {self.num_head_channels}-channel heads")
            return channels // self.num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"U-Net width {channels} is not divisible by {self.num_heads} attention heads")
        return self.num_heads


def _uniform_depths(attention_levels: tuple[int, ...], depth: int, n_levels: int) -> tuple[int, ...]:
    return tuple(depth if level in attention_levels else 0 for level in range(n_levels))


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


def sdxl_size_embedding(time_ids: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's micro-conditioning as the U-Net's ``y`` carries it after the pooled text embedding.

    ``time_ids`` [B, k] holds (original height, width, crop top, left, target height, width) for the base model
    (k = 6) or (original height, width, crop top, left, aesthetic score) for the refiner (k = 5). Each number gets
    the same cosine-first embedding as a timestep and the k embeddings are laid side by side: [B, k * dim]. This is
    generative-models' ConcatTimestepEmbedderND and diffusers' ``add_time_proj`` (flip_sin_to_cos, no shift).
    Then ``y = torch.cat([pooled, sdxl_size_embedding(time_ids)], dim=-1)``.
    """
    return timestep_embedding(time_ids.flatten(), dim).reshape(time_ids.shape[0], -1)


class Encoder(NamedTuple):
    """The U-Net's first half (what a ControlNet copies): embeddings, input blocks, middle block; and the width of
    each input block's output (its skip connection)."""

    time_embed: nn.Sequential
    label_emb: nn.Sequential | None
    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential
    skip_channels: list[int]


def build_encoder(cfg: UNetConfig) -> Encoder:
    """Built in the order UNetModel has always registered them, so default initialisation and random fills draw the
    same numbers as before the ControlNet shared this code."""
    mc = cfg.model_channels
    emb_dim = cfg.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    # LDM's "sequential" class embedding, one Sequential inside another: hence the keys label_emb.0.0 and
    # label_emb.0.2.
    label_emb: nn.Sequential | None = None
    if cfg.adm_in_channels is not None:
        label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )
    depths = cfg.level_depths
    input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    skip_channels = [mc]
    ch = mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
            ch = mult * mc
            if depths[level]:
                layers.append(attention_block(cfg, ch, depths[level]))
            input_blocks.append(TimestepEmbedSequential(layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
            skip_channels.append(ch)
    middle_block = TimestepEmbedSequential(
        [ResBlock(ch, emb_dim, ch), attention_block(cfg, ch, cfg.middle_depth), ResBlock(ch, emb_dim, ch)]
    )
    return Encoder(time_embed, label_emb, input_blocks, middle_block, skip_channels)


def attention_block(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    return SpatialTransformer(ch, cfg.heads(ch), depth, cfg.context_dim, cfg.use_linear_in_transformer)


def embed(module: nn.Module, cfg: UNetConfig, timesteps: torch.Tensor, y: torch.Tensor | None, batch: int,
          dtype: torch.dtype) -> torch.Tensor:
    """Time embedding plus, for an SDXL-style network (``label_emb``), the vector conditioning ``y``."""
    emb = module.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
    if module.label_emb is not None:
        adm = cfg.adm_in_channels
        if y is None:
            raise ValueError(f"this U-Net (SDXL-style) needs y: [batch, {adm}] pooled text + size embedding")
        if y.shape != (batch, adm):
            raise ValueError(f"y has shape {tuple(y.shape)}; this U-Net needs [{batch}, {adm}]")
        emb = emb + module.label_emb(y.to(dtype))
    elif y is not None:
        raise ValueError("this U-Net takes no y (it has no label_emb); y is for SDXL-style U-Nets")
    return emb


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        emb_dim = cfg.time_embed_dim
        enc = build_encoder(cfg)
        self.time_embed, self.label_emb = enc.time_embed, enc.label_emb
        self.input_blocks, self.middle_block = enc.input_blocks, enc.middle_block
        skip_channels = list(enc.skip_channels)
        depths = cfg.level_depths
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if depths[level]:
                    layers.append(attention_block(cfg, ch, depths[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None, fast: FastCall | None = None,
    ) -> torch.Tensor:
        """Predict the noise in ``x`` at (possibly fractional) ``timesteps`` given text ``context`` and, for an
        SDXL-style U-Net (``adm_in_channels`` set), the vector conditioning ``y`` [B, adm_in_channels].

        ``control``: ControlNet residuals, one per input block (in order) and one for the middle block: each is added
        to that block's skip connection, the last to the middle block's output (LDM's ControlledUnetModel, diffusers'
        down/mid additional residuals).

        ``fast`` (engine.fast_steps): with a cache branch B, a full call stores the features entering output block
        ``n - 1 - B`` in ``fast.stored``; a shallow call (``fast.kept``) runs input blocks 0..B and output blocks
        n-1-B..n-1 over the kept features instead of the deep blocks. ``fast.tome`` merges tokens in the
        self-attention of the highest-resolution level that has attention."""
        dtype = self.dtype
        emb = embed(self, self.config, timesteps, y, x.shape[0], dtype)
        h = x.to(dtype)
        context = context.to(dtype)
        n = len(self.input_blocks)
        branch = None if fast is None else fast.branch
        shallow = fast is not None and fast.shallow
        tome = None if fast is None else fast.tome
        merge_size = None
        if tome is not None and self.config.attention_levels:
            f = 2 ** min(self.config.attention_levels)
            merge_size = (-(-x.shape[-2] // f), -(-x.shape[-1] // f))  # ceil: Downsample pads odd sizes up

        def tome_at(t: torch.Tensor) -> TokenMerge | None:
            return tome if merge_size is not None and tuple(t.shape[-2:]) == merge_size else None

        skips: list[torch.Tensor] = []
        for block in self.input_blocks[: branch + 1] if shallow else self.input_blocks:  # type: ignore[operator]
            h = block(h, emb, context, None, tome_at(h))
            skips.append(h)
        if control is not None and len(control) != n + 1:
            raise ValueError(f"control has {len(control)} residuals; this U-Net takes {n + 1} "
                             f"({n} skips and the middle)")
        if shallow:
            h = fast.kept  # type: ignore[union-attr]
        else:
            h = self.middle_block(h, emb, context, None, tome_at(h))
            if control is not None:
                h = h + control[-1].to(dtype)
        if control is not None:
            skips = [s + c.to(dtype) for s, c in zip(skips, control)]
        first = n - len(skips)  # the output block that takes the last skip computed
        for j, block in enumerate(self.output_blocks):
            if j < first:
                continue
            if branch is not None and not shallow and j == n - 1 - branch:
                fast.stored = h  # type: ignore[union-attr]
            skip = skips.pop()
            h = torch.cat([h, skip], dim=1)
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, upsample_size, tome_at(h))
        return self.out(h)


# "<block>.1.transformer_blocks.<K>.": the SpatialTransformer of an input/output block or the middle block.
_TRANSFORMER_BLOCK = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.(\d+)\.")


def unet_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], num_heads: int = SD1_NUM_HEADS, num_head_channels: int | None = None,
    out_channels: int | None = None,
) -> UNetConfig:
    """Read the architecture from the (prefix-stripped) tensors of an LDM U-Net (SD 1.x, SD 2.x, SDXL).

    Everything but the attention heads is in the shapes and key names: levels and widths from the ResBlocks,
    transformer depth per level from the count of ``transformer_blocks.K``, linear projections from proj_in's
    ndim, context width from attn2.to_k, ``adm_in_channels`` from ``label_emb.0.0.weight``. Heads are in no shape,
    so the caller says: ``num_head_channels`` > 0 (SD 2.x, SDXL: 64, from the family table) sizes heads by width;
    otherwise each block has ``num_heads`` (SD 1.x: 8, or what a file of ours records in its metadata).
    ``out_channels`` given: the network has no output layer to read it from (a ControlNet, the U-Net's first half).

    Raises KeyError naming the first tensor it needed and did not find, ValueError for a layout that is not an LDM
    U-Net.
    """

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise KeyError(key)
        return sd[key]

    conv_in = need("input_blocks.0.0.weight")
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    if out_channels is None:
        out_channels = int(need("out.2.weight").shape[0])

    # One pass over the keys: the depth of every block's SpatialTransformer (blocks without one are absent).
    block_depth: dict[str, int] = {}
    for key in sd:
        m = _TRANSFORMER_BLOCK.match(key)
        if m:
            block_depth[m[1]] = max(block_depth.get(m[1], 0), int(m[2]) + 1)

    # Walk the input blocks: ResBlocks give each level's width and depth, Downsamples close a level.
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    mults: list[int] = []
    res_per_level: list[int] = []
    depths: list[int] = []
    level_depths: set[int] = set()
    count = 0
    level_mult = 0

    def close_level() -> None:
        if len(level_depths) != 1:
            raise ValueError(f"level {len(mults)} has transformer depths {sorted(level_depths)}: not an LDM U-Net")
        mults.append(level_mult)
        res_per_level.append(count)
        depths.append(level_depths.pop())

    for i in range(1, n_blocks):
        if f"input_blocks.{i}.0.op.weight" in sd:
            close_level()
            count = 0
            continue
        width = int(need(f"input_blocks.{i}.0.in_layers.2.weight").shape[0])
        if width % model_channels:
            raise ValueError(f"input_blocks.{i} width {width} is not a multiple of {model_channels}")
        level_mult = width // model_channels
        level_depths.add(block_depth.get(f"input_blocks.{i}", 0))
        count += 1
    close_level()
    if len(set(res_per_level)) != 1:
        raise ValueError(f"uneven ResBlocks per level {res_per_level}: not an LDM U-Net")

    proj_in = need("middle_block.1.proj_in.weight")
    attn2 = need("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if "label_emb.weight" in sd:
        raise ValueError("label_emb.weight: a class-label U-Net (an upscaler's noise level), not SD 1.x / 2.x / SDXL")
    label_emb = sd["label_emb.0.0.weight"] if "label_emb.0.0.weight" in sd else None
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(mults),
        num_res_blocks=res_per_level[0],
        num_heads=num_heads,
        context_dim=int(attn2.shape[1]),
        use_linear_in_transformer=proj_in.ndim == 2,
        num_head_channels=num_head_channels if num_head_channels and num_head_channels > 0 else -1,
        # __post_init__ folds uniform depths back into attention_levels + transformer_depth.
        transformer_depth_per_level=tuple(depths),
        transformer_depth_middle=block_depth["middle_block"],
        adm_in_channels=None if label_emb is None else int(label_emb.shape[1]),
    )

"""The Stable Diffusion AutoencoderKL ("first stage model"), written so that its module tree
carries exactly the parameter names of the LDM single-file checkpoint layout.

A single-file SD checkpoint stores the VAE under ``first_stage_model.``; after stripping that
prefix, ``AutoencoderKL(config).load_state_dict(sd)`` works with no renaming table. Keeping the
LDM names (rather than diffusers' ``down_blocks`` / ``to_q`` names) means the checkpoint is the
source of truth and there is nothing to drift out of sync.

Layout (``L = len(ch_mult)``, ``n = num_res_blocks``)::

    encoder.conv_in                       3 -> ch
    encoder.down.{i}.block.{0..n-1}       ResnetBlock, ch*in_mult[i] -> ch*ch_mult[i]
    encoder.down.{i}.downsample.conv      for i < L-1 (pad (0,1,0,1), stride-2 3x3 conv)
    encoder.mid.{block_1,attn_1,block_2}
    encoder.norm_out, encoder.conv_out    -> 2*z_channels (mean and logvar)
    quant_conv                            2*z_channels -> 2*embed_dim (1x1)
    post_quant_conv                       embed_dim -> z_channels (1x1)
    decoder.conv_in                       z_channels -> ch*ch_mult[-1]
    decoder.mid.{block_1,attn_1,block_2}
    decoder.up.{i}.block.{0..n}           n+1 ResnetBlocks; run from i = L-1 down to 0
    decoder.up.{i}.upsample.conv          for i > 0 (nearest x2, 3x3 conv)
    decoder.norm_out, decoder.conv_out    -> out_channels
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "vae_config_from_state_dict",
    "normalize_vae_state_dict",
    "load_vae_from_state_dict",
]

# LDM's Normalize(): 32 groups, eps 1e-6 (not torch's default 1e-5) -- a visible difference
# in decoded images if got wrong, so it is a named constant.
_NORM_GROUPS = 32
_NORM_EPS = 1e-6
# LDM clamps the posterior log-variance to keep exp() finite in half precision and in training.
_LOGVAR_MIN = -30.0
_LOGVAR_MAX = 20.0

# Top-level names of the parameters the model owns; anything else in a VAE file (``loss.*`` from
# the training discriminator / LPIPS, ``model_ema.*``, ...) is not part of the inference model.
_MODEL_KEY_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_ATTN_WEIGHT_RE = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    # Not stored in the weights: 0.18215 for SD 1.x/2.x, 0.13025 for SDXL.
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        # Accept a list for ch_mult but store a tuple so the config stays hashable and comparable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult:
            raise ValueError("VAEConfig.ch_mult must have at least one level")
        if self.num_res_blocks < 1:
            raise ValueError(f"VAEConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        for width in [self.ch] + [self.ch * m for m in self.ch_mult]:
            if width % _NORM_GROUPS:
                raise ValueError(
                    f"VAE channel width {width} is not divisible by the {_NORM_GROUPS} GroupNorm groups"
                )

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each axis (8 for SD); image sizes must be multiples of it."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_NORM_GROUPS, channels, eps=_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """LDM ResnetBlock without a time embedding (the VAE has none) and with dropout 0."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only present when the width changes: the checkpoint has `nin_shortcut.*` exactly then.
        self.nin_shortcut: nn.Conv2d | None = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections as stored
    in LDM files (see `normalize_vae_state_dict` for files that store them as linear weights)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            # (B, C, H, W) -> (B, heads=1, H*W, C): row-major positions, as LDM's reshape does. Contiguous,
            # because SDPA's flash / memory-efficient CUDA kernels refuse a transposed view and fall back to math.
            return t.reshape(b, 1, c, height * width).transpose(-1, -2).contiguous()

        # SDPA's default scale is 1/sqrt(head_dim) = 1/sqrt(C), which is LDM's scale for one head.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads right/bottom only, then convolves without padding; a symmetric padding=1 conv
        # would shift the sampling grid by one pixel and not match the trained weights.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _DownLevel(nn.Module):
    """One encoder resolution level: `block.{j}` then an optional `downsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        # The last level has no `downsample.*` keys in the checkpoint, so no module either.
        self.downsample: Downsample | None = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class _UpLevel(nn.Module):
    """One decoder resolution level: `block.{j}` then an optional `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.upsample: Upsample | None = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        in_mult = (1,) + mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList(
            _DownLevel(
                ch * in_mult[i],
                ch * mult[i],
                config.num_res_blocks,
                downsample=i != len(mult) - 1,
            )
            for i in range(len(mult))
        )
        top = ch * mult[-1]
        self.mid = _MidBlock(top)
        self.norm_out = _norm(top)
        # "double_z": the encoder emits mean and logvar stacked along channels.
        self.conv_out = nn.Conv2d(top, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, top, 3, padding=1)
        self.mid = _MidBlock(top)
        # `up.{i}` is indexed by resolution level (0 = full resolution) even though it runs from the
        # coarsest level first; level i takes the width of level i+1 (or the mid width at the top).
        self.up = nn.ModuleList(
            _UpLevel(
                ch * (mult[i + 1] if i + 1 < len(mult) else mult[-1]),
                ch * mult[i],
                config.num_res_blocks + 1,
                upsample=i != 0,
            )
            for i in range(len(mult))
        )
        self.norm_out = _norm(ch * mult[0])
        self.conv_out = nn.Conv2d(ch * mult[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's KL-regularised autoencoder. Parameter names are the LDM checkpoint's (prefix-stripped)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def _check_spatial(self, x: Tensor, multiple: int, what: str) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"{what} height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}"
            )

    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels in [-1, 1], (B, in_channels, H, W) -> (mean, logvar) of the latent posterior
        after quant_conv, unscaled; logvar clamped to [-30, 20] as LDM does."""
        self._check_spatial(pixels, self.config.downscale_factor, "pixels")
        moments = self.quant_conv(self.encoder(pixels))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> pixels, nominally in [-1, 1], not clamped."""
        self._check_spatial(z, 1, "latents")
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(
        self,
        images01: Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Images in [0, 1] -> latents scaled by `scaling_factor`, ready for the UNet.

        With no generator the posterior mean is returned (deterministic img2img). With a generator
        a posterior sample is drawn; a sequence gives one generator per image so that each image's
        noise depends only on its own seed, not on the batch it happens to be in. Noise is drawn in
        float32 on the generator's device and then moved, so a CPU generator gives the same latents
        on every device and dtype.
        """
        pixels = images01.to(device=self.device, dtype=self.dtype) * 2.0 - 1.0
        mean, logvar = self.encode(pixels)
        if generator is None:
            z = mean
        else:
            noise = _posterior_noise(mean, generator)
            z = mean + torch.exp(0.5 * logvar) * noise
        return z * self.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1] (clamped), in the model's dtype."""
        z = latents.to(device=self.device, dtype=self.dtype) / self.config.scaling_factor
        return ((self.decode(z) + 1.0) / 2.0).clamp(0.0, 1.0)


def _posterior_noise(mean: Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    if isinstance(generator, torch.Generator):
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    else:
        generators = list(generator)
        if len(generators) != mean.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {mean.shape[0]} images")
        noise = torch.cat(
            [
                torch.randn((1, *mean.shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(mean.device)
                for g in generators
            ]
        )
    return noise.to(device=mean.device, dtype=mean.dtype)


def normalize_vae_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bring a prefix-stripped VAE state dict into exactly the shape `AutoencoderKL` expects.

    - Keeps only model keys (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`):
      training leftovers such as `loss.*` or `model_ema.*` are dropped.
    - Mid-block attention weights stored as linear (2-D, `[C, C]`) or conv1d (3-D, `[C, C, 1]`)
      are reshaped to the 1x1 conv form `[C, C, 1, 1]` (views; no copies).
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(_MODEL_KEY_PREFIXES):
            continue
        if _ATTN_WEIGHT_RE.match(key) and value.ndim in (2, 3):
            value = value.reshape(*value.shape[:2], 1, 1)
        out[key] = value
    return out


def _require(sd: Mapping[str, Tensor], key: str) -> Tensor:
    try:
        return sd[key]
    except KeyError:
        raise KeyError(f"VAE state dict is missing {key!r} (expected prefix-stripped LDM layout)") from None


def _level_indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` over the keys; must be 0..n-1."""
    regex = re.compile(pattern)
    found = sorted({int(m.group(1)) for k in sd if (m := regex.match(k))})
    if found != list(range(len(found))):
        raise ValueError(f"VAE state dict has non-contiguous indices {found} for pattern {pattern!r}")
    return found


def vae_config_from_state_dict(
    sd: Mapping[str, Tensor], *, scaling_factor: float = VAEConfig.scaling_factor
) -> VAEConfig:
    """Infer the VAE architecture from a prefix-stripped state dict's keys and shapes.

    The scaling factor is not stored in the weights, so it is a keyword (SDXL: 0.13025).
    Raises KeyError naming the first missing key, ValueError for inconsistent shapes.
    """
    conv_in = _require(sd, "encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(_require(sd, "decoder.conv_out.weight").shape[0])
    z_channels = int(_require(sd, "decoder.conv_in.weight").shape[1])
    embed_dim = int(_require(sd, "post_quant_conv.weight").shape[1])

    enc_conv_out = int(_require(sd, "encoder.conv_out.weight").shape[0])
    if enc_conv_out != 2 * z_channels:
        raise ValueError(
            f"encoder.conv_out has {enc_conv_out} output channels; expected 2 * z_channels = {2 * z_channels}"
        )
    quant_out = int(_require(sd, "quant_conv.weight").shape[0])
    if quant_out != 2 * embed_dim:
        raise ValueError(f"quant_conv has {quant_out} output channels; expected 2 * embed_dim = {2 * embed_dim}")

    levels = _level_indices(sd, r"^encoder\.down\.(\d+)\.")
    if not levels:
        raise KeyError("VAE state dict is missing 'encoder.down.0.block.0.conv1.weight' (no encoder levels)")
    num_res_blocks = len(_level_indices(sd, r"^encoder\.down\.0\.block\.(\d+)\."))

    ch_mult: list[int] = []
    for i in levels:
        width = int(_require(sd, f"encoder.down.{i}.block.0.conv1.weight").shape[0])
        if width % ch:
            raise ValueError(f"encoder.down.{i} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
        n = len(_level_indices(sd, rf"^encoder\.down\.{i}\.block\.(\d+)\."))
        if n != num_res_blocks:
            raise ValueError(f"encoder.down.{i} has {n} res blocks, encoder.down.0 has {num_res_blocks}")

    # The decoder must mirror the encoder (LDM builds both from one ddconfig); checking it here
    # gives a readable error instead of a wall of size mismatches from load_state_dict.
    up_levels = _level_indices(sd, r"^decoder\.up\.(\d+)\.")
    if len(up_levels) != len(levels):
        raise ValueError(f"decoder has {len(up_levels)} up levels, encoder has {len(levels)} down levels")
    for i in up_levels:
        n = len(_level_indices(sd, rf"^decoder\.up\.{i}\.block\.(\d+)\."))
        if n != num_res_blocks + 1:
            raise ValueError(f"decoder.up.{i} has {n} res blocks; expected num_res_blocks + 1 = {num_res_blocks + 1}")
        width = int(_require(sd, f"decoder.up.{i}.block.0.conv2.weight").shape[0])
        if width != ch * ch_mult[i]:
            raise ValueError(f"decoder.up.{i} width {width} != encoder.down.{i} width {ch * ch_mult[i]}")

    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
        scaling_factor=scaling_factor,
    )


def load_vae_from_state_dict(
    sd: Mapping[str, Tensor],
    *,
    scaling_factor: float = VAEConfig.scaling_factor,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AutoencoderKL:
    """Normalise, infer the config, build and strictly load a VAE from a prefix-stripped state dict.

    Missing or unexpected keys raise KeyError naming them (strict loading: a silently
    half-initialised VAE produces plausible-looking garbage, which is worse than failing).
    """
    clean = normalize_vae_state_dict(sd)
    config = vae_config_from_state_dict(clean, scaling_factor=scaling_factor)
    # Build on the meta device so that no time is spent on random init that is overwritten anyway.
    with torch.device("meta"):
        model = AutoencoderKL(config)
    expected = set(model.state_dict())
    missing = sorted(expected - clean.keys())
    unexpected = sorted(clean.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"VAE state dict does not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(clean, strict=True, assign=True)
    # `assign=True` adopts the file's tensors (and dtype); bring everything to one dtype/device.
    target_dtype = dtype if dtype is not None else next(iter(clean.values())).dtype
    model.to(device=device, dtype=target_dtype)
    return model.eval()

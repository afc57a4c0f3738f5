"""Our LDM-layout U-Net against diffusers' UNet2DConditionModel with identical random weights.

The weights travel through diffusers' own single-file conversion (convert_ldm_unet_checkpoint), which is an
independent check that our module names are the LDM checkpoint's names.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from engine.checkpoint import UNET_PREFIX  # noqa: E402
from engine.unet import UNetConfig, UNetModel, unet_config_from_state_dict  # noqa: E402
from engine.random_checkpoint import TINY_UNET, randomize_  # noqa: E402

CONFIGS = {
    "tiny": TINY_UNET,
    # Three levels, two ResBlocks each, attention only on the first two, depth-2 transformers, 9-ch inpaint input.
    "deeper-inpaint": UNetConfig(
        in_channels=9,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(0, 1),
        num_heads=4,
        context_dim=24,
        transformer_depth=2,
    ),
}


def diffusers_config(cfg: UNetConfig) -> dict:
    levels = range(len(cfg.channel_mult))
    return {
        "sample_size": 8,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": [
            "CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)
        ],
        "cross_attention_dim": cfg.context_dim,
        # Legacy diffusers naming: for SD 1.x "attention_head_dim" is the number of heads.
        "attention_head_dim": cfg.num_heads,
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    randomize_(ours, torch.Generator().manual_seed(1))
    ldm = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}

    # The config is recoverable from the shapes alone (heads excepted: they are not in any shape).
    assert unet_config_from_state_dict(ours.state_dict(), num_heads=cfg.num_heads) == cfg

    dcfg = diffusers_config(cfg)
    ref = UNet2DConditionModel(**dcfg).eval()
    converted = convert_ldm_unet_checkpoint(ldm, dcfg)
    missing, unexpected = ref.load_state_dict(converted, strict=True)
    assert not missing and not unexpected

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg.in_channels, 16, 24, generator=gen)
    t = torch.tensor([999.0, 500.5, 1.0])
    ctx = torch.randn(3, 77, cfg.context_dim, generator=gen)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == (3, cfg.out_channels, 16, 24)
    assert a.abs().mean() > 1e-2  # a silent all-zero network would otherwise "match"
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_unet_odd_latent_size_matches_skip_shapes() -> None:
    # 5x7 latents do not halve evenly; the decoder must upsample to its skip connection's size.
    ours = UNetModel(TINY_UNET).eval()
    with torch.no_grad():
        out = ours(torch.randn(1, 4, 5, 7), torch.tensor([10.0]), torch.randn(1, 77, TINY_UNET.context_dim))
    assert out.shape == (1, 4, 5, 7)


def test_unet_half_precision_runs_and_tracks_float32() -> None:
    ours = UNetModel(TINY_UNET).eval()
    randomize_(ours, torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([700.0, 20.0])
    ctx = torch.randn(2, 77, TINY_UNET.context_dim)
    with torch.no_grad():
        ref = ours(x, t, ctx)
        low = ours.to(torch.bfloat16)(x, t, ctx).float()
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()

"""Our LDM-layout U-Net against diffusers' UNet2DConditionModel with identical random weights.

The weights travel through diffusers' own single-file conversion (convert_ldm_unet_checkpoint), which is an
independent check that our module names are the LDM checkpoint's names. SD 1.x, SD 2.x (head width, linear
projections) and SDXL (per-level depth, label_emb fed with pooled text + size embedding) each have a tiny config;
the real configs are checked at full size on the meta device (shapes and names, no weights).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from engine.checkpoint import UNET_PREFIX  # noqa: E402
from engine.unet import UNetConfig, UNetModel, sdxl_size_embedding, unet_config_from_state_dict  # noqa: E402
from engine.random_checkpoint import TINY_UNET, randomize_  # noqa: E402

# SDXL's y = pooled text embedding + 6 size numbers, each embedded this wide (tiny stand-ins for 1280 and 256).
POOLED_DIM, SIZE_DIM = 16, 8

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
    # SD 2.x: heads sized by width (4 heads at 32 channels, 8 at 64), Linear proj_in/proj_out, attention everywhere.
    "sd2-style": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_head_channels=8,
        context_dim=32,
        use_linear_in_transformer=True,
    ),
    # SDXL: no attention at full resolution, deeper transformers further down, label_emb for y.
    "sdxl-style": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        num_head_channels=8,
        context_dim=32,
        use_linear_in_transformer=True,
        transformer_depth_per_level=(0, 2, 3),
        transformer_depth_middle=3,
        adm_in_channels=POOLED_DIM + 6 * SIZE_DIM,
    ),
}

# The published architectures (Stability-AI configs; DESIGN.md "Family facts").
REAL_CONFIGS = {
    "sd15": UNetConfig(),
    "sd2": UNetConfig(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True),
    "sdxl-base": UNetConfig(
        channel_mult=(1, 2, 4), num_head_channels=64, context_dim=2048, use_linear_in_transformer=True,
        transformer_depth_per_level=(0, 2, 10), transformer_depth_middle=10, adm_in_channels=2816,
    ),
    "sdxl-refiner": UNetConfig(
        model_channels=384, num_head_channels=64, context_dim=1280, use_linear_in_transformer=True,
        transformer_depth_per_level=(0, 4, 4, 0), transformer_depth_middle=4, adm_in_channels=2560,
    ),
}
# Parameter counts of the published U-Nets (diffusers' models of the same checkpoints report the same numbers).
REAL_PARAMETERS = {"sd15": 859_520_964, "sd2": 865_910_724, "sdxl-base": 2_567_463_684}


def diffusers_config(cfg: UNetConfig, size_dim: int = SIZE_DIM) -> dict:
    levels = range(len(cfg.channel_mult))
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    # diffusers gives the middle block the deepest level's depth; a level without attention ignores its entry,
    # so that entry can carry the middle's depth.
    layers = [d or cfg.middle_depth for d in cfg.level_depths]
    assert layers[-1] == cfg.middle_depth, "diffusers cannot express this middle depth"
    dcfg = {
        "sample_size": 8,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": [
            "CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)
        ],
        "cross_attention_dim": cfg.context_dim,
        # Legacy diffusers naming: "attention_head_dim" is the number of heads (per level).
        "attention_head_dim": [cfg.heads(w) for w in widths],
        "transformer_layers_per_block": layers,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if cfg.adm_in_channels is not None:
        dcfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=size_dim,
            projection_class_embeddings_input_dim=cfg.adm_in_channels,
        )
    return dcfg


def _pair(cfg: UNetConfig) -> tuple[UNetModel, UNet2DConditionModel]:
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    randomize_(ours, torch.Generator().manual_seed(1))
    ldm = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    dcfg = diffusers_config(cfg)
    ref = UNet2DConditionModel(**dcfg).eval()
    converted = convert_ldm_unet_checkpoint(ldm, dcfg)
    missing, unexpected = ref.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    return ours, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    ours, ref = _pair(cfg)

    # The config is recoverable from the shapes alone (heads excepted: they are not in any shape).
    assert unet_config_from_state_dict(ours.state_dict(), cfg.num_heads, cfg.num_head_channels) == cfg

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg.in_channels, 16, 24, generator=gen)
    t = torch.tensor([999.0, 500.5, 1.0])
    ctx = torch.randn(3, 77, cfg.context_dim, generator=gen)
    y, added = None, None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(3, POOLED_DIM, generator=gen)
        # (original h, w, crop top, left, target h, w): the numbers an SDXL pipeline passes.
        time_ids = torch.tensor(
            [[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 832, 1216], [512, 512, 0, 0, 1024, 1024]]
        )
        y = torch.cat([pooled, sdxl_size_embedding(time_ids, SIZE_DIM)], dim=-1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        a = ours(x, t, ctx, y)
        b = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    assert a.shape == (3, cfg.out_channels, 16, 24)
    assert a.abs().mean() > 1e-2  # a silent all-zero network would otherwise "match"
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_sdxl_y_changes_the_output() -> None:
    # Guards the parity test above: y must actually reach the network (a dropped label_emb would match nothing).
    ours = UNetModel(CONFIGS["sdxl-style"]).eval()
    randomize_(ours, torch.Generator().manual_seed(4))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 32)
    y = torch.randn(1, POOLED_DIM + 6 * SIZE_DIM)
    with torch.no_grad():
        assert not torch.allclose(ours(x, t, ctx, y), ours(x, t, ctx, y + 1.0))


def test_sdxl_size_embedding_is_diffusers_add_time_proj() -> None:
    ref = UNet2DConditionModel(**diffusers_config(CONFIGS["sdxl-style"], size_dim=256))
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [896, 1152, 64, 0, 896, 1152]])
    ours = sdxl_size_embedding(time_ids, 256)
    assert ours.shape == (2, 6 * 256)
    assert torch.equal(ours, ref.add_time_proj(time_ids.flatten()).reshape(2, -1))
    # Cosine half first: a zero crop embeds as 256/2 ones then 256/2 zeros.
    assert torch.equal(ours[0, 2 * 256 : 3 * 256], torch.cat([torch.ones(128), torch.zeros(128)]))


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_architectures_have_diffusers_names_and_shapes(name: str) -> None:
    """Full-size SD 1.5 / SD 2.x / SDXL base / refiner on the meta device: every converted tensor has the name and
    shape diffusers' model of that architecture has, and the config is read back from the shapes."""
    cfg = REAL_CONFIGS[name]
    with torch.device("meta"):
        ours = UNetModel(cfg)
        dcfg = diffusers_config(cfg, size_dim=256)
        ref = UNet2DConditionModel(**dcfg)
    sd = ours.state_dict()
    assert unet_config_from_state_dict(sd, num_head_channels=cfg.num_head_channels) == cfg
    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in sd.items()}, dcfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if name in REAL_PARAMETERS:
        assert sum(p.numel() for p in ours.parameters()) == REAL_PARAMETERS[name]


def test_sdxl_config_facts() -> None:
    cfg = REAL_CONFIGS["sdxl-base"]
    assert cfg.attention_levels == (1, 2) and cfg.level_depths == (0, 2, 10) and cfg.middle_depth == 10
    assert [cfg.heads(320 * m) for m in (2, 4)] == [10, 20]
    ours = UNetModel(CONFIGS["sdxl-style"])
    assert "label_emb.0.0.weight" in ours.state_dict() and "label_emb.0.2.weight" in ours.state_dict()
    assert not any(k.startswith("input_blocks.1.1.") for k in ours.state_dict())  # no attention at level 0


def test_depth_spellings_are_one_config() -> None:
    # Uniform depths fold into the SD 1.x spelling, so equality means "same network".
    assert UNetConfig(transformer_depth_per_level=(1, 1, 1, 0)) == UNetConfig()
    assert UNetConfig(transformer_depth_per_level=(1, 1, 1, 0)).transformer_depth_per_level is None
    refiner = REAL_CONFIGS["sdxl-refiner"]
    assert refiner.transformer_depth_per_level is None and refiner.attention_levels == (1, 2)
    assert refiner.transformer_depth == refiner.middle_depth == 4
    # A middle depth of its own needs the per-level spelling.
    deep_middle = UNetConfig(transformer_depth_middle=3)
    assert deep_middle.transformer_depth_per_level == (1, 1, 1, 0) and deep_middle.middle_depth == 3
    assert replace(deep_middle, transformer_depth_middle=1) == UNetConfig()
    # The middle defaults to the deepest level's depth.
    assert UNetConfig(channel_mult=(1, 2, 4), transformer_depth_per_level=(0, 2, 10)).middle_depth == 10
    assert UNetConfig(transformer_depth_per_level=(1, 1, 1, 0)).middle_depth == 1
    with pytest.raises(ValueError, match="levels"):
        UNetConfig(transformer_depth_per_level=(0, 2, 10))


def test_y_is_checked() -> None:
    sdxl = UNetModel(CONFIGS["sdxl-style"]).eval()
    sd1 = UNetModel(TINY_UNET).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0]), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="needs y"):
        sdxl(x, t, ctx)
    with pytest.raises(ValueError, match=r"needs \[2, 64\]"):
        sdxl(x, t, ctx, torch.randn(2, 63))
    with pytest.raises(ValueError, match="takes no y"):
        sd1(x, t, ctx, torch.randn(2, 64))


def test_head_width_must_divide_the_channels() -> None:
    with pytest.raises(ValueError, match="multiple of 24-channel heads"):
        UNetModel(replace(CONFIGS["sd2-style"], num_head_channels=24))


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

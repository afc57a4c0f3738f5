"""Our U-Net's diffusers names (engine.adapters.lora_names) against diffusers' own LDM -> diffusers conversion.

The reference mapping is built independently: every tensor of our U-Net is filled with its own id, the LDM state
dict goes through ``convert_ldm_unet_checkpoint``, and each diffusers key then says which LDM tensor it holds.
"""

from __future__ import annotations

import pytest
import torch

from engine.adapters.lora_names import ModuleIndex, Target, diffusers_unet_names
from engine.checkpoint import UNET_PREFIX
from engine.random_checkpoint import TINY_TEXT, TINY_UNET
from engine.text_encoder import TextEncoderConfig, build_text_encoder
from engine.unet import UNetConfig, UNetModel

CONFIGS = {
    "tiny": TINY_UNET,
    # Three levels, two ResBlocks each, no attention at the full-resolution level (so the upsampler sits in slot 1
    # of one level and slot 2 of another), depth-2 transformers.
    "deeper": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                         num_heads=4, context_dim=24, transformer_depth=2),
    # Four levels, three ResBlocks, attention only in the middle levels, linear projections (SD 2 style).
    "wide-linear": UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=3, attention_levels=(1, 2),
                              num_heads=2, context_dim=16, use_linear_in_transformer=True),
}


def reference_mapping(cfg: UNetConfig) -> dict[str, str]:
    """diffusers module path -> LDM module path, read off diffusers' converter."""
    diffusers_loaders = pytest.importorskip("diffusers.loaders.single_file_utils")
    from tests.engine.test_unet_parity import diffusers_config

    unet = UNetModel(cfg)
    names = list(unet.state_dict())
    ldm = {UNET_PREFIX + n: torch.full(v.shape, float(i)) for i, (n, v) in enumerate(unet.state_dict().items())}
    converted = diffusers_loaders.convert_ldm_unet_checkpoint(ldm, diffusers_config(cfg))
    out: dict[str, str] = {}
    for key, value in converted.items():
        source = names[int(value.flatten()[0].item())]
        module, _, _ = key.rpartition(".")
        ldm_module, _, _ = source.rpartition(".")
        assert out.setdefault(module, ldm_module) == ldm_module, key
    assert len(converted) == len(names)  # every tensor went somewhere
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_names_match_diffusers_conversion(name: str) -> None:
    cfg = CONFIGS[name]
    with torch.device("meta"):
        unet = UNetModel(cfg)
    weighted = [n for n, m in unet.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    ours = diffusers_unet_names(cfg, weighted)
    assert ours == reference_mapping(cfg)
    assert sorted(ours.values()) == sorted(weighted)  # every module with weights has its diffusers name


def test_sd15_examples_from_a1111_and_kohya() -> None:
    # The worked examples of DESIGN.md "Adapter facts", on the real SD 1.5 layout (built on the meta device).
    with torch.device("meta"):
        index = ModuleIndex(UNetModel(UNetConfig()), build_text_encoder(TextEncoderConfig()))
    cases = {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "down_blocks_1_resnets_0_conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks_2_downsamplers_0_conv": "input_blocks.9.0.op",
        "mid_block_attentions_0_proj_in": "middle_block.1.proj_in",
        "mid_block_resnets_1_time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
        "up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv",
        "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj": "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
        "up_blocks_3_resnets_2_conv_shortcut": "output_blocks.11.0.skip_connection",
        "time_embedding_linear_1": "time_embed.0",
        "conv_out": "out.2",
        # LDM spellings resolve too.
        "input_blocks_4_1_transformer_blocks_0_attn2_to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
        "output_blocks_8_2_conv": "output_blocks.8.2.conv",
    }
    for kohya, ldm in cases.items():
        assert index.resolve("unet", kohya, dotted=False) == Target("unet", ldm), kohya
    assert index.resolve("unet", "down_blocks.3.attentions.0.proj_in", dotted=True) is None  # level 3 has no attention
    assert index.resolve("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", dotted=True) == Target(
        "unet", "middle_block.1.transformer_blocks.0.attn1.to_out.0")
    te = "text_encoder"
    assert index.resolve(te, "text_model_encoder_layers_11_mlp_fc2", dotted=False) == Target(te, "encoder.layers.11.mlp.fc2")
    assert index.resolve(te, "text_model.encoder.layers.3.self_attn.out_proj", dotted=True) == Target(
        te, "encoder.layers.3.self_attn.out_proj")
    assert index.resolve(te, "encoder.layers.3.self_attn.q_proj", dotted=True) == Target(te, "encoder.layers.3.self_attn.q_proj")
    assert index.resolve(te, "text_model_encoder_layers_12_mlp_fc1", dotted=False) is None


def test_tiny_model_indexes_every_weighted_module() -> None:
    with torch.device("meta"):
        unet, te = UNetModel(TINY_UNET), build_text_encoder(TINY_TEXT)
    index = ModuleIndex(unet, te)
    for name, module in unet.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            assert index.resolve("unet", name.replace(".", "_"), dotted=False) == Target("unet", name)

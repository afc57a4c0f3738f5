"""Our LDM-layout ControlNet against diffusers' ControlNetModel with identical tiny random weights, and the U-Net's
``control`` residuals against diffusers' down/mid additional residuals.

The weights travel through diffusers' own single-file conversion (convert_controlnet_checkpoint), an independent check
that our module names are the LDM ControlNet checkpoint's. SD 1.x-style and SDXL-style (label_emb, per-level depth)
tiny configs; the real SD 1.5 / SDXL ControlNets are checked at full size on the meta device (names and shapes).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import ControlNetModel as DiffusersControlNet  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

from engine.controlnet import ControlNetModel  # noqa: E402
from engine.random_checkpoint import TINY_UNET, randomize_  # noqa: E402
from engine.random_controlnet import controlnet_state_dict, random_controlnet  # noqa: E402
from engine.unet import UNetModel, sdxl_size_embedding  # noqa: E402
from tests.engine.test_unet_parity import CONFIGS, POOLED_DIM, REAL_CONFIGS, SIZE_DIM, diffusers_config  # noqa: E402

TOL = 1e-4
PARITY_CONFIGS = {"sd1-style": TINY_UNET, "sdxl-style": CONFIGS["sdxl-style"]}


def diffusers_controlnet(ours: ControlNetModel, size_dim: int = SIZE_DIM, ldm: dict | None = None) -> DiffusersControlNet:
    """diffusers' ControlNet of our config (via from_unet), its weights converted by diffusers from ``ldm`` (the tensors
    of an LDM-layout file; default: ``ours``' own)."""
    cfg = ours.config
    unet = UNet2DConditionModel(**diffusers_config(replace(cfg, out_channels=4), size_dim=size_dim))
    ref = DiffusersControlNet.from_unet(unet, conditioning_embedding_out_channels=ours.hint_widths,
                                        load_weights_from_unet=False)
    ldm = controlnet_state_dict(ours, "ldm") if ldm is None else ldm
    converted = convert_controlnet_checkpoint(ldm, {"layers_per_block": cfg.num_res_blocks})
    # diffusers' converter maps only the "layers" table; SDXL's label_emb is its "addition_embed_type" entry.
    for i, j in ((1, 0), (2, 2)):
        for p in ("weight", "bias"):
            if f"control_model.label_emb.0.{j}.{p}" in ldm:
                converted[f"add_embedding.linear_{i}.{p}"] = ldm[f"control_model.label_emb.0.{j}.{p}"]
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def _inputs(cfg, gen: torch.Generator, b: int = 2, hw: tuple[int, int] = (6, 10)):
    x = torch.randn(b, cfg.in_channels, *hw, generator=gen)
    hint = torch.rand(b, 3, hw[0] * 8, hw[1] * 8, generator=gen)
    t = torch.tensor([999.0, 321.5][:b])
    ctx = torch.randn(b, 7, cfg.context_dim, generator=gen)
    y = added = None
    if cfg.adm_in_channels is not None:
        pooled = torch.randn(b, POOLED_DIM, generator=gen)
        time_ids = torch.tensor([[64.0, 80, 0, 0, 48, 80], [512, 512, 8, 16, 48, 80]][:b])
        y = torch.cat([pooled, sdxl_size_embedding(time_ids, SIZE_DIM)], dim=-1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return x, hint, t, ctx, y, added


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_controlnet_residuals_match_diffusers(name: str) -> None:
    ours = random_controlnet(PARITY_CONFIGS[name], seed=1)
    ref = diffusers_controlnet(ours)
    x, hint, t, ctx, y, added = _inputs(ours.config, torch.Generator().manual_seed(2))
    with torch.no_grad():
        mine = ours(x, hint, t, ctx, y)
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=1.0,
                        added_cond_kwargs=added, return_dict=False)
    theirs = [*down, mid]
    assert len(mine) == len(theirs) == len(ours.input_blocks) + 1
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        assert a.abs().mean() > 1e-2  # random zero convs: every residual carries signal
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


def test_the_hint_reaches_the_residuals() -> None:
    ours = random_controlnet("sd1", seed=3)
    x, hint, t, ctx, _, _ = _inputs(ours.config, torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours(x, hint, t, ctx), ours(x, hint.flip(-1), t, ctx)
    assert all(not torch.allclose(p, q) for p, q in zip(a, b))


def test_unet_control_is_diffusers_additional_residuals() -> None:
    cfg = CONFIGS["sdxl-style"]
    unet = UNetModel(cfg).eval()
    randomize_(unet, torch.Generator().manual_seed(5))
    dcfg = diffusers_config(cfg)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
                                                    dcfg), strict=True)
    x, _, t, ctx, y, added = _inputs(cfg, torch.Generator().manual_seed(6), hw=(8, 8))
    with torch.no_grad():
        control = random_controlnet(cfg, seed=7)(x, torch.rand(2, 3, 64, 64), t, ctx, y)
        plain = unet(x, t, ctx, y)
        mine = unet(x, t, ctx, y, control)
        theirs = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                     down_block_additional_residuals=tuple(control[:-1]), mid_block_additional_residual=control[-1]).sample
        zeros = unet(x, t, ctx, y, [torch.zeros_like(c) for c in control])
    torch.testing.assert_close(mine, theirs, rtol=TOL, atol=TOL)
    assert (mine - plain).abs().mean() > 1e-2
    assert torch.equal(zeros, plain)  # adding zero residuals is the plain U-Net, bit for bit
    with pytest.raises(ValueError, match="residuals"):
        unet(x, t, ctx, y, control[:-1])


def test_the_hint_must_be_eight_times_the_latent() -> None:
    ours = random_controlnet("sd1", seed=0)
    x, hint, t, ctx, _, _ = _inputs(ours.config, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="8x the latent"):
        ours(x, hint[..., :-8], t, ctx)


@pytest.mark.parametrize("name", ["sd15", "sdxl-base"])
def test_real_controlnets_have_diffusers_names_and_shapes(name: str) -> None:
    """SD 1.5's and SDXL's published ControlNet architecture on the meta device: the LDM names of the checkpoints
    (input_hint_block.0..14, zero_convs.0..N, middle_block_out.0) convert to diffusers' model's names and shapes."""
    cfg = REAL_CONFIGS[name]
    with torch.device("meta"):
        ours = ControlNetModel(cfg)
        unet = UNet2DConditionModel(**diffusers_config(cfg, size_dim=256))
        ref = DiffusersControlNet.from_unet(unet, load_weights_from_unet=False)
    sd = ours.state_dict()
    assert {k for k in sd if k.startswith("input_hint_block.")} == {f"input_hint_block.{i}.{p}" for i in range(0, 16, 2)
                                                                     for p in ("weight", "bias")}
    assert len(ours.zero_convs) == (12 if name == "sd15" else 9)
    converted = convert_controlnet_checkpoint(controlnet_state_dict(ours, "bare"), {"layers_per_block": 2})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("add_embedding.")}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    # our own diffusers-layout names (the writer's, which the loader reads back) are diffusers' model's names
    assert {k: tuple(v.shape) for k, v in controlnet_state_dict(ours, "diffusers").items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if name == "sd15":  # the published SD 1.5 ControlNet's parameter count (diffusers' model of it agrees)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_a_step_is_found_from_its_sigma_for_every_sampler() -> None:
    from engine.control_steps import ControlSteps

    steps = ControlSteps([], torch.tensor([10.0, 5.0, 2.0, 0.0]))
    # a step's own sigma, and a second-order sampler's evaluation between two sigmas, belong to that step
    assert [steps.step_index(s) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 0.5)] == [0, 0, 1, 1, 2, 2]
    assert steps.at(torch.tensor([5.0])) is None  # no controls: the plain U-Net

"""Random-weight ControlNets in the three file layouts engine.controlnet_loading reads, for tests and smoke runs.

A ControlNet for a tiny random checkpoint has that checkpoint's U-Net config (engine.random_checkpoint's tiny presets)
and the published hint encoder (16/32/96/256, 8x down: the tiny VAEs downsample 8x as well). Its zero convs are not
zero, unlike a freshly initialised one, so that it visibly steers the model.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import torch
from safetensors.torch import save_file

from engine.controlnet import HINT_WIDTHS, ControlNetModel, hint_block_indices
from engine.diffusers_folder import _RESNET
from engine.random_checkpoint import randomize_, random_spec
from engine.unet import UNetConfig

__all__ = ["LAYOUTS", "controlnet_state_dict", "diffusers_name", "random_controlnet", "write_random_controlnet"]

LAYOUTS = ("ldm", "bare", "diffusers")
_LDM_TO_DIFFUSERS_RESNET = {ldm: diff for diff, ldm in _RESNET.items()}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2", "input_blocks.0.0": "conv_in",
        "middle_block_out.0": "controlnet_mid_block"}


def random_controlnet(unet: UNetConfig | str = "sd1", seed: int = 0, *, hint_widths: tuple[int, ...] = HINT_WIDTHS
                      ) -> ControlNetModel:
    """A ControlNet for ``unet`` (a config, or a family name whose tiny preset's U-Net it copies), random weights."""
    cfg = random_spec(unet, "tiny").unet if isinstance(unet, str) else unet
    model = ControlNetModel(replace(cfg, out_channels=cfg.in_channels), hint_widths=hint_widths)
    randomize_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def diffusers_name(name: str, cfg: UNetConfig, n_hint_widths: int) -> str:
    """The diffusers ControlNetModel name of an LDM ControlNet tensor name."""
    stem, _, last = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{last}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0", stem):
        return f"controlnet_down_blocks.{m[1]}.{last}"
    if m := re.fullmatch(r"input_hint_block\.(\d+)", stem):
        index = hint_block_indices(n_hint_widths).index(int(m[1]))
        last_index = 2 * n_hint_widths - 1
        part = "conv_in" if index == 0 else "conv_out" if index == last_index else f"blocks.{index - 1}"
        return f"controlnet_cond_embedding.{part}.{last}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", name):
        j, rest = int(m[1]), m[2]
        return f"mid_block.attentions.0.{rest}" if j == 1 else f"mid_block.resnets.{j // 2}.{_resnet(rest)}"
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", name)
    if m is None:
        raise ValueError(f"no diffusers name for {name!r}")
    step = cfg.num_res_blocks + 1
    i, part, rest = int(m[1]), int(m[2]), m[3]
    b, j = divmod(i - 1, step)
    if j == cfg.num_res_blocks:
        return f"down_blocks.{b}.downsamplers.0.conv.{rest.removeprefix('op.')}"
    if part == 1:
        return f"down_blocks.{b}.attentions.{j}.{rest}"
    return f"down_blocks.{b}.resnets.{j}.{_resnet(rest)}"


def _resnet(rest: str) -> str:
    part, _, last = rest.rpartition(".")
    return f"{_LDM_TO_DIFFUSERS_RESNET[part]}.{last}"


def controlnet_state_dict(model: ControlNetModel, layout: str = "ldm", dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the names of ``layout``: "ldm" (control_model.*), "bare" or "diffusers"."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: {', '.join(LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(dtype or t.dtype).contiguous()
        if layout == "ldm":
            out[f"control_model.{name}"] = t
        elif layout == "bare":
            out[name] = t
        else:
            out[diffusers_name(name, model.config, len(model.hint_widths))] = t
    return out


def write_random_controlnet(
    path: str | os.PathLike[str],
    unet: UNetConfig | str = "sd1",
    *,
    layout: str = "ldm",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Write a random ControlNet for ``unet`` (a U-Net config, or "sd1" / "sd2" / "sdxl" for the tiny checkpoints
    of engine.random_checkpoint) in ``layout``; returns the path."""
    model = random_controlnet(unet, seed)
    save_file(controlnet_state_dict(model, layout, dtype), str(path))
    return str(path)

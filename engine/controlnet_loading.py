"""Reading ControlNet files: three layouts, one network (:class:`engine.controlnet.ControlNetModel`).

- A1111 / lllyasviel: ``control_model.*`` (the original v1.0 files also hold a whole SD model beside it, which is
  ignored, as A1111 and ComfyUI ignore it);
- bare LDM names: ``time_embed.0.weight``, ``zero_convs.0.0.weight`` (e.g. the SD 2.1 ControlNets);
- diffusers' ControlNetModel: ``controlnet_cond_embedding.*``, ``down_blocks.*``, ``controlnet_down_blocks.N``,
  ``controlnet_mid_block``: renamed to the LDM names with the U-Net's mapping (engine.diffusers_folder) plus the
  ControlNet's own modules.

The architecture comes from the shapes, as for a checkpoint's U-Net; the heads (in no shape) are the target U-Net's,
whose copy a ControlNet is. The family shows in the shapes too: ``label_emb`` is SDXL, Linear ``proj_in`` (or
context 1024) SD 2.x, else SD 1.x; a ControlNet steers only a model of its family and of the same block widths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, ShapeView, StateDict, file_sha256, open_state_dict
from engine.controlnet import ControlNetModel, hint_block_indices
from engine.diffusers_folder import _unet_prefixes
from engine.loading import ModelFile, _config, _materialize
from engine.unet import UNetConfig, unet_config_from_state_dict

__all__ = ["ControlNetInfo", "LoadedControlNet", "controlnet_family", "controlnet_fit_problem", "inspect_controlnet",
           "load_controlnet", "skip_channels"]

LDM_PREFIX = "control_model."
_HINT_KEY = re.compile(r"input_hint_block\.(\d+)\.weight")
_DIFFUSERS_OWN = re.compile(r"(controlnet_down_blocks)\.(\d+)\.(weight|bias)|controlnet_mid_block\.(weight|bias)|"
                            r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)")


@dataclass(frozen=True)
class ControlNetInfo:
    """What a ControlNet file is, from its key names and shapes (no tensor read)."""

    path: Path
    layout: str  # "ldm" (control_model.*), "bare", "diffusers"
    config: UNetConfig  # heads are placeholders until fitted to a U-Net (no shape carries them)
    hint_channels: int
    hint_widths: tuple[int, ...]
    keys: Mapping[str, str]  # LDM name -> the file's key

    @property
    def family(self) -> str:
        return controlnet_family(self.config)

    @property
    def hint_factor(self) -> int:
        return 2 ** (len(self.hint_widths) - 1)


@dataclass
class LoadedControlNet:
    model: ControlNetModel
    file: ModelFile  # name, path and sha256: the infotext's "Model: name [hash]"
    layout: str

    @property
    def family(self) -> str:
        return controlnet_family(self.model.config)


def controlnet_family(cfg: UNetConfig) -> str:
    """The family label (as engine.families labels it) that a U-Net-shaped network's shapes give away."""
    if cfg.adm_in_channels is not None:
        return "SDXL"
    if cfg.use_linear_in_transformer or cfg.context_dim == 1024:
        return "SD 2.x"
    return "SD 1.x"


def skip_channels(cfg: UNetConfig) -> list[int]:
    """Width of each input block's output: what the residuals of a ControlNet of this config must match."""
    widths = [cfg.model_channels]
    for level, mult in enumerate(cfg.channel_mult):
        widths += [mult * cfg.model_channels] * cfg.num_res_blocks
        if level != len(cfg.channel_mult) - 1:
            widths.append(mult * cfg.model_channels)
    return widths


def _layout(sd: StateDict) -> tuple[str, dict[str, str]]:
    """(layout, LDM name -> file key) of a ControlNet file; CheckpointError for anything else."""
    prefixed = {k[len(LDM_PREFIX):]: k for k in sd if k.startswith(LDM_PREFIX)}
    if prefixed:
        return "ldm", prefixed
    if "zero_convs.0.0.weight" in sd and "time_embed.0.weight" in sd:
        return "bare", {k: k for k in sd}
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return "diffusers", _diffusers_names(sd)
    if any(k.startswith("lora_controlnet") or "lora" in k.split(".")[-2:-1] for k in list(sd)[:50]):
        what = "a Control-LoRA, which is not supported"
    elif any(k.startswith("model.diffusion_model.") for k in sd):
        what = "a Stable Diffusion checkpoint"
    else:
        what = "not a ControlNet"
    raise CheckpointError(sd.path, f"{what}: no ControlNet tensors (control_model.*, bare LDM zero_convs.*, or diffusers' "
                                   "controlnet_cond_embedding.*)")


def _diffusers_names(sd: StateDict) -> dict[str, str]:
    """diffusers ControlNetModel names -> LDM names, with the U-Net's renaming for the shared blocks."""
    levels = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")), default=0)
    per = 1 + max((int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets.")), default=0)
    blocks = 1 + max((int(m[6]) for k in sd if (m := _DIFFUSERS_OWN.fullmatch(k)) and m[6] is not None), default=-1)
    # The U-Net renaming needs only the block structure; a ControlNet has no up blocks, so none are named.
    unet_name = _unet_prefixes({"down_block_types": ["?"] * levels, "up_block_types": ["?"] * levels,
                                "layers_per_block": per}, sd.path)
    hint = hint_block_indices(blocks // 2 + 1)
    out: dict[str, str] = {}
    for key in sd:
        m = _DIFFUSERS_OWN.fullmatch(key)
        if m is None:
            name = unet_name(key)
        elif m[1]:
            name = f"zero_convs.{m[2]}.0.{m[3]}"
        elif m[4]:
            name = f"middle_block_out.0.{m[4]}"
        else:
            part = m[5]
            index = 0 if part == "conv_in" else hint[-1] if part == "conv_out" else hint[1 + int(m[6])]
            name = f"input_hint_block.{index}.{m[7]}"
        if name is None or name.startswith(("out.", "output_blocks.")):
            raise CheckpointError(sd.path, "unexpected tensor in a diffusers ControlNet", key)
        out[name] = key
    return out


def _hint_widths(sd: StateDict, keys: Mapping[str, str]) -> tuple[int, tuple[int, ...]]:
    """(hint channels, widths) from the hint block's convs: conv_in, then pairs (same width, stride 2), then conv_out."""
    indices = sorted(int(m[1]) for n in keys if (m := _HINT_KEY.fullmatch(n)))
    if not indices or len(indices) % 2 or indices != hint_block_indices(len(indices) // 2):
        raise CheckpointError(sd.path, f"input_hint_block has convs {indices}; a ControlNet's are 0, 2, ..., 4n - 2 "
                                       "(conv in, pairs of a conv and a stride-2 conv, conv out)")
    shapes = [sd.shape(keys[f"input_hint_block.{i}.weight"]) for i in indices]
    widths = tuple(int(shapes[k][0]) for k in range(0, len(shapes) - 1, 2))
    return int(shapes[0][1]), widths


def inspect_controlnet(path: str | os.PathLike[str], allow_pickle: bool = False) -> ControlNetInfo:
    """The file's layout and architecture, read from its names and shapes; CheckpointError if it is no ControlNet."""
    sd = open_state_dict(path, allow_pickle)
    return _inspect(sd)


def _inspect(sd: StateDict) -> ControlNetInfo:
    layout, keys = _layout(sd)
    view = _Shapes(sd, keys)
    cfg: UNetConfig = _config(sd, "ControlNet", lambda: unet_config_from_state_dict(view, out_channels=4), keys)
    cfg = replace(cfg, out_channels=cfg.in_channels)
    hint_channels, widths = _hint_widths(sd, keys)
    return ControlNetInfo(sd.path, layout, cfg, hint_channels, widths, keys)


def controlnet_fit_problem(info: ControlNetInfo, unet: UNetConfig, model_family: str, vae_factor: int) -> str | None:
    """Why the ControlNet cannot steer this U-Net (one sentence), or None if it can."""
    cn = info.config
    if info.family != model_family:
        return f"an {info.family} ControlNet cannot steer an {model_family} model"
    if cn.context_dim != unet.context_dim or cn.adm_in_channels != unet.adm_in_channels:
        return (f"its text conditioning (context {cn.context_dim}, y {cn.adm_in_channels}) is not the model's "
                f"(context {unet.context_dim}, y {unet.adm_in_channels})")
    if skip_channels(cn) != skip_channels(unet):
        return f"its residual widths {skip_channels(cn)} are not the model's skip widths {skip_channels(unet)}"
    if cn.in_channels != unet.out_channels:
        return f"it reads {cn.in_channels} latent channels, the model has {unet.out_channels}"
    if info.hint_factor != vae_factor:
        return f"its hint encoder downsamples {info.hint_factor}x but the model's VAE {vae_factor}x"
    return None


def load_controlnet(
    path: str | os.PathLike[str],
    unet: UNetConfig,
    model_family: str,
    *,
    vae_factor: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    sha256: str | None = None,
) -> LoadedControlNet:
    """The ControlNet in ``path`` for a model whose U-Net is ``unet`` (family label ``model_family``, e.g. "SD 1.x"),
    on ``device`` in ``dtype``. ``sha256``, when given, must be the file's (a request pinned to a recorded file).
    CheckpointError (one line, naming the file) for a file that is no ControlNet or does not fit the model."""
    digest = file_sha256(path)
    if sha256 is not None and sha256 != digest:
        raise CheckpointError(path, f"the file changed since it was recorded: sha256 {digest[:12]}..., expected "
                                    f"{sha256[:12]}...")
    sd = open_state_dict(path, allow_pickle)
    info = _inspect(sd)
    problem = controlnet_fit_problem(info, unet, model_family, vae_factor)
    if problem:
        raise CheckpointError(path, problem)
    # Heads are in no shape: a ControlNet is a copy of its model's U-Net, heads included.
    cfg = replace(info.config, num_heads=unet.num_heads, num_head_channels=unet.num_head_channels)
    model = _materialize(lambda: ControlNetModel(cfg, info.hint_channels, info.hint_widths), sd, info.keys,
                         torch.device(device), dtype)
    p = Path(path)
    return LoadedControlNet(model, ModelFile(path=p, name=p.stem, sha256=digest), info.layout)  # type: ignore[arg-type]


class _Shapes(ShapeView):
    """Meta tensors of the file's shapes under the LDM names (config inference reads no tensor)."""

    def __init__(self, sd: StateDict, keys: Mapping[str, str]):  # noqa: D107 - ShapeView with a renaming
        self._sd = sd
        self._names = dict(keys)
        self._keys = list(self._names)
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return torch.empty(self._sd.shape(self._names[key]), device="meta")


"""Which module of a loaded model a LoRA key means.

LoRA files name modules in three spellings: kohya's ``lora_unet_<path with "." -> "_">`` (SD 1.x files carry
diffusers' U-Net paths, SDXL files the LDM paths), diffusers/PEFT's dotted diffusers paths, and LDM paths. Like
A1111 and ComfyUI we never split those underscores by hand: the lookup tables below are built from the loaded
model's own module names (our U-Net's are the LDM names) plus the diffusers name of each of them, which follows
from the U-Net's config by the same walk over levels that :class:`engine.unet.UNetModel` builds its blocks with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from engine.unet import UNetConfig

UNET = "unet"
TEXT_ENCODER = "text_encoder"  # SD 1.x / 2.x: the one text encoder; SDXL: CLIP-L (kohya's lora_te1_)
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second encoder, OpenCLIP bigG (kohya's lora_te2_): no SD 1.x model has one
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)

# diffusers' ResnetBlock2D part -> the LDM ResBlock's part (the index is the layer's place in its nn.Sequential).
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the level structure.
UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's vector conditioning (pooled text + size embedding); absent from U-Nets without a label_emb.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


@dataclass(frozen=True)
class Target:
    """One module of the loaded model: ``part`` is "unet", "text_encoder" or "text_encoder_2", ``module`` its path
    in that network."""

    part: str
    module: str


def diffusers_unet_blocks(cfg: UNetConfig) -> dict[str, str]:
    """diffusers block path -> LDM block path for every block of a U-Net of this config.

    Resnets and attentions map block to block (``down_blocks.b.resnets.j`` -> ``input_blocks.N.0``); the
    down/upsampler entries already name the conv itself, since that is the only module those blocks hold.
    """
    out = dict(UNET_TOP_LEVEL)
    levels = len(cfg.channel_mult)
    nrb = cfg.num_res_blocks
    block = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(nrb):
            out[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{block}.0"
            if level in cfg.attention_levels:
                out[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if level != levels - 1:
            out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            block += 1
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    # diffusers numbers the up blocks from the deepest level; each level has one more ResBlock than on the way
    # down (it also takes the downsampler's skip), and all but the full-resolution level end in an upsampler,
    # which is the last member of that level's last output block.
    block = 0
    for b in range(levels):
        level = levels - 1 - b
        attention = level in cfg.attention_levels
        for j in range(nrb + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{block}.0"
            if attention:
                out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{block}.1"
            if level != 0 and j == nrb:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{block}.{2 if attention else 1}.conv"
            block += 1
    return out


def diffusers_unet_names(cfg: UNetConfig, ldm_modules: Iterable[str]) -> dict[str, str]:
    """diffusers module path -> LDM module path, for each of ``ldm_modules`` (our U-Net's module names) that
    diffusers has (every module with parameters does)."""
    to_diffusers = {ldm: d for d, ldm in diffusers_unet_blocks(cfg).items()}
    out: dict[str, str] = {}
    for name in ldm_modules:
        parts = name.split(".")
        # The longest block prefix wins: "input_blocks.3.0.op" is a block of its own inside "input_blocks.3.0"'s range.
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix not in to_diffusers:
                continue
            block, rest = to_diffusers[prefix], ".".join(parts[n:])
            if ".resnets." in block and rest:
                inner = next((d for d, ldm in RESNET_PARTS.items() if rest == ldm or rest.startswith(ldm + ".")), None)
                if inner is None:
                    break  # a container (in_layers itself): no diffusers counterpart
                rest = inner + rest[len(RESNET_PARTS[inner]):]
            out[f"{block}.{rest}" if rest else block] = name
            break
    return out


def _weighted_modules(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters themselves (the ones a LoRA can patch)."""
    return [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]


class ModuleIndex:
    """Lookups from every spelling a LoRA file may use to the modules of one loaded U-Net and text encoder(s)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None):
        self.modules: dict[Target, nn.Module] = {}
        self._kohya: dict[tuple[str, str], Target | None] = {}
        self._dotted: dict[tuple[str, str], Target | None] = {}

        unet_names = _weighted_modules(unet)
        unet_mods = dict(unet.named_modules())
        diffusers = diffusers_unet_names(unet.config, unet_names)  # type: ignore[arg-type]
        for name in unet_names:
            self._add(UNET, name, unet_mods[name], [name])
        for dname, name in diffusers.items():
            self._add(UNET, name, unet_mods[name], [dname])

        for part, encoder in ((TEXT_ENCODER, text_encoder), (TEXT_ENCODER_2, text_encoder_2)):
            if encoder is None:
                continue
            te_mods = dict(encoder.named_modules())
            for name in _weighted_modules(encoder):
                # CLIPTextModel has no "text_model." level in transformers 5, CLIPTextModelWithProjection (bigG)
                # has one; every LoRA file spells it. Both spellings resolve.
                bare = name.removeprefix("text_model.")
                self._add(part, name, te_mods[name], [bare, f"text_model.{bare}"])

    def _add(self, part: str, name: str, module: nn.Module, spellings: list[str]) -> None:
        target = Target(part, name)
        self.modules[target] = module
        for spelling in spellings:
            for table, key in ((self._dotted, spelling), (self._kohya, spelling.replace(".", "_"))):
                seen = table.get((part, key), target)
                # Two modules with one underscore spelling would be ambiguous: such a key resolves to nothing.
                table[(part, key)] = target if seen == target else None

    def resolve(self, part: str, name: str, *, dotted: bool) -> Target | None:
        """The module ``name`` means in ``part``: a kohya underscore name (``dotted=False``, without the
        ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` prefix) or a dotted diffusers / LDM / transformers path."""
        return (self._dotted if dotted else self._kohya).get((part, name))

    def module(self, target: Target) -> nn.Module:
        return self.modules[target]

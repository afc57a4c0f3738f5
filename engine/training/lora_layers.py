"""Trainable LoRA modules attached to a loaded model's U-Net and text encoder, named as kohya names them.

Each target (a Linear or Conv2d of the frozen base) gets ``down`` (kaiming-uniform, as kohya and PEFT start it) and
``up`` (zeros, so step 0 renders exactly the base model), and its output becomes ``base(x) + (alpha / rank) *
up(down(x))``. The modules are attached with forward hooks, not by replacing the base modules, so the base networks
keep their own module names and state-dict keys (the merger, the pipeline and the loader keep working on them) and
removing the LoRA is removing the hooks.

Targets are those of kohya's ``networks.lora`` (what A1111, ComfyUI and diffusers expect in a LoRA file): in the
U-Net every Linear and 1x1 Conv2d inside a transformer (attention to_q/to_k/to_v/to_out.0, proj_in/proj_out, ff),
optionally (``conv``, LoCon) the resnets' and down/upsamplers' 3x3 convs; in the text encoder the attention q/k/v/out
projections and the MLP fc1/fc2 (SDXL: both encoders, ``lora_te1_`` CLIP-L and ``lora_te2_`` bigG, as sd-scripts'
``sdxl_train_network`` names them). File names come from :func:`engine.adapters.lora_names.diffusers_unet_names` (SD
1.x/2.x kohya files spell the U-Net in diffusers paths, SDXL files in LDM paths) and each one is checked against
:class:`~engine.adapters.lora_names.ModuleIndex`, the very lookup our merger reads files with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from engine.adapters.lora_names import TEXT_ENCODER, TEXT_ENCODER_2, UNET, ModuleIndex, diffusers_unet_names

UNET_LINEAR_SUFFIXES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
)
TEXT_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
KOHYA_PREFIX = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_", TEXT_ENCODER_2: "lora_te2_"}
SDXL_KOHYA_PREFIX = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}


class LoraLayer(nn.Module):
    """down/up of one target; ``alpha`` is kept as a buffer so it is saved with the weights (kohya does the same)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, rank, bias=False)
            self.up: nn.Module = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            # down takes the base conv's geometry (LoCon 3x3, stride 2 downsamplers); up is always 1x1.
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"a LoRA targets Linear or Conv2d, not {type(base).__name__}")
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.up.weight)
        self.to(device=base.weight.device)  # float32 always: the trainable weights keep full precision
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * (self.scale * self.multiplier)


@dataclass(frozen=True)
class LoraTarget:
    part: str  # engine.adapters.lora_names UNET / TEXT_ENCODER / TEXT_ENCODER_2
    module: str  # path in that network (our LDM names for the U-Net)
    kohya: str  # the file's module stem, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"


def _kind_ok(module: nn.Module, conv: bool) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) or conv
    return False


def find_targets(models, *, text_encoder: bool, conv: bool = False) -> list[tuple[LoraTarget, nn.Module]]:
    """The LoRA targets of a loaded model, each with its kohya name (checked against our merger's lookup)."""
    sdxl = models.text_encoder_2 is not None or models.family.name.startswith("sdxl")
    prefixes = SDXL_KOHYA_PREFIX if sdxl else KOHYA_PREFIX
    unet_mods = dict(models.unet.named_modules())
    # diffusers path -> LDM path; we need the reverse (kohya SD 1.x/2.x files carry the diffusers path).
    to_diffusers = {ldm: d for d, ldm in diffusers_unet_names(models.unet.config, list(unet_mods)).items()}
    found: list[tuple[LoraTarget, nn.Module]] = []
    for name, module in unet_mods.items():
        in_transformer = ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
        wanted = (in_transformer and name.endswith(UNET_LINEAR_SUFFIXES) and _kind_ok(module, False)) or (
            conv and isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1) and name in to_diffusers
            and not name.startswith(("input_blocks.0.", "out.")))
        if not wanted:
            continue
        path = name if sdxl else to_diffusers[name]
        found.append((LoraTarget(UNET, name, prefixes[UNET] + path.replace(".", "_")), module))
    if text_encoder:
        encoders = [(TEXT_ENCODER, models.text_encoder), (TEXT_ENCODER_2, models.text_encoder_2)]
        for part, encoder in encoders:
            if encoder is None:
                continue
            for name, module in encoder.named_modules():
                if name.endswith(TEXT_SUFFIXES) and isinstance(module, nn.Linear):
                    bare = name.removeprefix("text_model.")
                    found.append((LoraTarget(part, name, prefixes[part] + f"text_model.{bare}".replace(".", "_")), module))
    index = ModuleIndex(models.unet, models.text_encoder, models.text_encoder_2)
    for target, module in found:
        stem = target.kohya.removeprefix(prefixes[target.part])
        resolved = index.resolve(target.part, stem, dotted=False)
        if resolved is None or index.module(resolved) is not module:
            raise RuntimeError(f"{target.kohya} would not load back into {target.part} {target.module}")
    return found


class LoraNetwork(nn.Module):
    """All LoRA layers of one training run, attached to the base modules with forward hooks."""

    def __init__(self, targets: list[tuple[LoraTarget, nn.Module]], rank: int, alpha: float, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.targets = [t for t, _ in targets]
        self.layers = nn.ModuleDict()
        self._bases = [m for _, m in targets]
        for target, base in targets:
            self.layers[target.kohya] = LoraLayer(base, rank, alpha, generator)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> "LoraNetwork":
        self.detach()
        for target, base in zip(self.targets, self._bases):
            layer = self.layers[target.kohya]

            def hook(_m: nn.Module, args: tuple, output: torch.Tensor, layer: LoraLayer = layer) -> torch.Tensor:
                return output + layer.delta(args[0]).to(output.dtype)

            self._handles.append(base.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_multiplier(self, value: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = value  # type: ignore[assignment]

    def parameters_of(self, part: str) -> Iterator[nn.Parameter]:
        for target in self.targets:
            if (target.part == UNET) == (part == UNET):
                yield from self.layers[target.kohya].parameters()

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """kohya keys: ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight``, ``<stem>.alpha``."""
        out: dict[str, torch.Tensor] = {}
        for stem, layer in self.layers.items():
            out[f"{stem}.lora_down.weight"] = layer.down.weight.detach()
            out[f"{stem}.lora_up.weight"] = layer.up.weight.detach()
            out[f"{stem}.alpha"] = layer.alpha.detach()
        return out

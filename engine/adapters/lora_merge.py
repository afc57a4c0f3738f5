"""Merging LoRAs into a loaded model's weights, switching between sets, and returning to the base weights.

A merge changes the U-Net's and text encoders' parameters in place: W = base + sum(strength * dW) per touched
parameter, added in float32 and cast back to the parameter's dtype (float16 / bfloat16 models round once).
Memory stays near one LoRA file: deltas are computed and added a block of rows at a time, and nothing of the
model is copied. Undoing a merge re-reads the touched tensors from the checkpoint and casts them exactly as
loading did (``LoadedModels.base_weights``), so the base comes back bit for bit; models with no file to re-read
keep the originals of touched parameters in memory instead, and so do networks whose parameters are no 1:1 copy
of a file tensor (SDXL's bigG and SD 2.x's OpenCLIP tower: their q/k/v are slices of a fused tensor).

Everything that can fail (hash, file, family, names, shapes) is checked for every LoRA of a set before the first
weight changes; should a merge still fail half-way (a read error), the touched weights are restored first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.adapters.lora_file import LoraFile, LoraModule, open_lora
from engine.adapters.lora_math import BIAS_ROLES, WeightDelta, bias_delta, fits, scale
from engine.adapters.lora_names import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODERS, UNET, ModuleIndex, Target
from engine.adapters.refs import AdapterError, LoraUse
from engine.checkpoint import file_sha256
from engine.loading import LoadedModels

# Rows per block are chosen so that a block of a delta (and its float32 accumulator) stays about this many
# elements: a few MB, against the tens of MB a whole SD 1.5 feed-forward delta takes in float32.
BLOCK_ELEMENTS = 1 << 20


@dataclass
class _Contribution:
    lora: LoraFile
    module: LoraModule
    strength: float
    scale: float


@dataclass
class _ParamPlan:
    """One parameter to change and what each LoRA adds to it."""

    part: str
    name: str  # parameter name inside its network ("input_blocks.1.1.proj_in.weight")
    param: nn.Parameter
    is_bias: bool
    contributions: list[_Contribution] = field(default_factory=list)


class LoraMerger:
    """Keeps a loaded model's weights equal to its base weights plus the deltas of the active LoRA set."""

    def __init__(self, models: LoadedModels):
        self.models = models
        self._index: ModuleIndex | None = None
        self._active: tuple[LoraUse, ...] | None = ()  # None: unknown after a failed restore
        self._active_key: Counter | None = Counter()
        # Parameters that may differ from their base value, per part: exactly what a restore re-reads.
        self._touched: dict[str, set[str]] = {UNET: set(), TEXT_ENCODER: set(), TEXT_ENCODER_2: set()}

    @property
    def active(self) -> tuple[LoraUse, ...]:
        return self._active or ()

    @property
    def index(self) -> ModuleIndex:
        if self._index is None:
            self._index = ModuleIndex(self.models.unet, self.models.text_encoder, self.models.text_encoder_2)
        return self._index

    def activate(self, loras: Sequence[LoraUse]) -> None:
        """Make the weights base + the deltas of ``loras`` (``()``: the base). The same set again does nothing."""
        loras = tuple(loras)
        key = Counter(_identity(u) for u in loras)
        if self._active is not None and key == self._active_key:
            return
        plans = self._plan(loras)  # raises before any weight changes
        if plans or any(self._touched.values()):
            self.models.base_weights.check()
        self._active, self._active_key = None, None
        try:
            self._restore()
            for plan in plans:
                self._merge(plan)
        except BaseException:
            self._restore()  # leave the base, not half a merge
            self._active, self._active_key = (), Counter()
            raise
        self._active, self._active_key = loras, key

    # ---- planning: everything that can be refused, without touching a weight ------------------------------

    def _plan(self, loras: tuple[LoraUse, ...]) -> list[_ParamPlan]:
        plans: dict[tuple[str, str], _ParamPlan] = {}
        for use in loras:
            lora = self._open(use)
            for module in lora.modules:
                strength = use.te if module.part in TEXT_ENCODERS else use.unet
                target = self._target(lora, module)
                weight_shape, bias_shape = lora.delta_shapes(module)
                mod = self.index.module(target)
                alpha, rs_lora = lora.alpha(module)
                factor = scale(module.kind, lora.shapes(module), alpha, rs_lora)
                for is_bias, shape in ((False, weight_shape), (True, bias_shape)):
                    if shape is None:
                        continue
                    param = getattr(mod, "bias" if is_bias else "weight", None)
                    key = module.keys[BIAS_ROLES[module.kind]] if is_bias else module.tensor_keys()[0]
                    if not isinstance(param, nn.Parameter):
                        raise AdapterError(lora.path, f"{target.module} has no {'bias' if is_bias else 'weight'} to patch", key)
                    if not fits(shape, tuple(param.shape)) or (is_bias and len(shape) != 1):
                        raise AdapterError(
                            lora.path, f"delta of shape {shape} does not fit {target.module}.{'bias' if is_bias else 'weight'} "
                                       f"of shape {tuple(param.shape)} in the loaded model", key)
                    if strength == 0:
                        continue  # checked like the rest, but adds nothing: strength 0 is the base exactly
                    name = f"{target.module}.{'bias' if is_bias else 'weight'}"
                    plan = plans.setdefault((target.part, name), _ParamPlan(target.part, name, param, is_bias))
                    plan.contributions.append(_Contribution(lora, module, strength, factor))
        return list(plans.values())

    def _open(self, use: LoraUse) -> LoraFile:
        path = Path(use.file.path)
        if use.file.sha256:
            try:
                actual = file_sha256(path)
            except OSError as exc:
                raise AdapterError(path, f"cannot be read ({exc.strerror or exc})") from exc
            if actual.lower() != use.file.sha256.lower():
                raise AdapterError(path, f"sha256 is {actual[:12]}..., not the {use.file.sha256[:12]}... the request "
                                         "recorded: the file changed or is another one")
        lora = open_lora(path)
        family, model = lora.family, self.models.family
        if family.label != model.label:
            raise AdapterError(path, f"this LoRA is for {family.label} models; the loaded model is {model.label}")
        return lora

    def _target(self, lora: LoraFile, module: LoraModule) -> Target:
        part = module.part if module.part in (UNET, *TEXT_ENCODERS) else None
        target = self.index.resolve(part, module.name, dotted=module.dotted) if part else None
        if target is None:
            two = self.models.text_encoder_2 is not None
            where = {UNET: "U-Net", TEXT_ENCODER: "first (CLIP-L) text encoder" if two else "text encoder",
                     TEXT_ENCODER_2: "second (OpenCLIP bigG) text encoder"}.get(module.part, module.part)
            raise AdapterError(lora.path, f"matches no {where} module of the loaded {self.models.family.label} model",
                               module.tensor_keys()[0])
        return target

    # ---- changing weights ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _merge(self, plan: _ParamPlan) -> None:
        param = plan.param
        self.models.base_weights.remember(plan.part, plan.name, param.data)
        self._touched[plan.part].add(plan.name)
        data = param.data
        if plan.is_bias:
            acc = data.float()
            for c in plan.contributions:
                b = c.lora.read(c.module.keys[BIAS_ROLES[c.module.kind]]).to(data.device)
                acc = acc + c.strength * bias_delta(c.module.kind, b, c.scale)
            data.copy_(acc)
            return
        deltas = []
        for c in plan.contributions:
            tensors = {role: t.to(data.device) for role, t in c.lora.tensors(c.module).items()}
            deltas.append((c.strength, WeightDelta(c.module.kind, tensors, c.scale, tuple(data.shape))))
        rows = data.shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, math.prod(data.shape[1:])))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            view = data[start:stop]
            # float32 weights are added to in place; others get a float32 copy of the block, rounded once at the end.
            acc = view if view.dtype == torch.float32 else view.float()
            for strength, delta in deltas:
                acc.add_(delta.block(start, stop), alpha=strength)
            if acc is not view:
                view.copy_(acc)

    @torch.no_grad()
    def _restore(self) -> None:
        """Every touched parameter back to its base value (bit for bit), then forgotten."""
        base = self.models.base_weights
        for part, names in self._touched.items():
            if not names:
                continue
            params = dict(self._network(part).named_parameters())
            for name, value in base.read(part, sorted(names)):
                p = params[name]
                p.data.copy_(value.to(device=p.device, dtype=p.dtype))
                names.discard(name)
                base.forget(part, name)

    def _network(self, part: str) -> nn.Module:
        net = {UNET: self.models.unet, TEXT_ENCODER: self.models.text_encoder,
               TEXT_ENCODER_2: self.models.text_encoder_2}[part]
        assert net is not None, part  # a part is only touched after it resolved to a module of the model
        return net


def _identity(use: LoraUse) -> tuple:
    """What makes two uses the same merge: LoraUse.key, and for a file without a recorded hash its size and mtime,
    so that a file replaced under the same path is merged again."""
    if use.file.sha256:
        return use.key
    try:
        st = Path(use.file.path).stat()
        return use.key + (st.st_size, st.st_mtime_ns)
    except OSError:
        return use.key

"""Reading a LoRA-family file into one normalised form, whatever trainer wrote it, and describing it.

Key spellings (DESIGN.md "Adapter facts"):

* kohya / LyCORIS: ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_`` / ``lora_te2_``), the path with
  "." -> "_", then ``.lora_down.weight`` / ``.lora_up.weight`` / ``.lora_mid.weight`` / ``.alpha``, ``.hada_*``,
  ``.lokr_*`` or ``.diff`` / ``.diff_b``;
* diffusers / PEFT: ``unet.<diffusers path>.lora_A.weight`` / ``lora_B.weight`` (older: ``.lora.down.weight``,
  ``.lora_linear_layer.down.weight``, attention processors' ``...attn1.processor.to_q_lora.down.weight``),
  ``text_encoder.text_model.<path>...``; alpha from ``<module>.alpha`` or diffusers' ``lora_adapter_metadata``
  (PEFT's LoraConfig: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``), or ``adapter_config.json`` beside a
  PEFT ``adapter_model.*`` file.

Opening a file reads its key and shape table only; tensors are read module by module when merged.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.adapters.lora_math import OPTIONAL, REQUIRED, DeltaShapeError, Shape, delta_shape, rank
from engine.adapters.lora_names import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from engine.adapters.refs import AdapterError
from engine.checkpoint import (PICKLE_SUFFIXES, CheckpointError, StateDict, load_weights_only, open_state_dict,
                               weights_only_refusal)
from engine.families import FAMILIES, Family

KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_te1_", TEXT_ENCODER), ("lora_te2_", TEXT_ENCODER_2), ("lora_te_", TEXT_ENCODER))
DOTTED_PREFIXES = (("unet.", UNET), ("text_encoder_2.", TEXT_ENCODER_2), ("text_encoder.", TEXT_ENCODER))
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: JSON of LoraConfig fields per component

# kohya / LyCORIS tensor suffix -> (kind, role); kind None: belongs to whatever kind the module is.
KOHYA_ROLES: dict[str, tuple[str | None, str]] = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"), "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"), "diff_b": ("full", "diff_b"),
    "alpha": (None, "alpha"),
}
# Longest first where one ends another; "_lora.down.weight" (attention processors) never ends ".lora.down.weight".
DOTTED_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
# Known but not mergeable here: refused by name rather than as an unknown key.
# (kohya-style suffixes; on dotted keys only the two DoRA names are looked for.)
UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "w_norm": "LyCORIS norm modules", "b_norm": "LyCORIS norm modules", "oft_blocks": "OFT", "oft_diag": "OFT",
    "lokr_t1": "LoKr with a Tucker w1", "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA",
    "b2.weight": "GLoRA", "on_input": "IA3", "weight": "IA3",
}
# The attention-processor format names q/k/v/out by diffusers' attention spelling, also in the text encoder.
PROCESSOR_NAMES = {
    UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    TEXT_ENCODER: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
    TEXT_ENCODER_2: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
FORMAT_LABELS = {"lora": "kohya LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "LyCORIS full"}
_FAMILY = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class LoraModule:
    """One patched module as the file has it. ``stem`` is the file's key prefix (what errors and listings show);
    ``name`` is what :meth:`engine.adapters.lora_names.ModuleIndex.resolve` takes in ``part``."""

    stem: str
    part: str
    name: str
    dotted: bool
    kind: str
    keys: dict[str, str]  # role -> key in the file; "alpha" included when the file has one

    def tensor_keys(self) -> list[str]:
        return [k for role, k in self.keys.items() if role != "alpha"]


@dataclass
class PeftAlpha:
    """What a PEFT LoraConfig says about scaling, for one component."""

    lora_alpha: float | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, module: str) -> float | None:
        for pattern, value in self.alpha_pattern.items():
            # PEFT matches a pattern against the end of the module path (as a regex).
            try:
                if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                    return float(value)
            except re.error:
                if module == pattern or module.endswith("." + pattern):
                    return float(value)
        return self.lora_alpha


class LoraFile:
    """An opened LoRA file: its modules, metadata and shapes; tensors are read on demand."""

    def __init__(self, path: Path, sd: StateDict, modules: list[LoraModule], peft: dict[str, PeftAlpha]):
        self.path = path
        self.metadata = dict(sd.metadata)
        self.modules = modules
        self._sd = sd
        self._peft = peft

    def shape(self, key: str) -> Shape:
        return tuple(int(n) for n in self._sd.shape(key))

    def shapes(self, module: LoraModule) -> dict[str, Shape]:
        return {role: self.shape(k) for role, k in module.keys.items() if role != "alpha"}

    def read(self, key: str) -> torch.Tensor:
        try:
            return self._sd[key]
        except CheckpointError as exc:
            raise as_adapter_error(exc) from exc

    def tensors(self, module: LoraModule) -> dict[str, torch.Tensor]:
        return {role: self.read(k) for role, k in module.keys.items() if role != "alpha"}

    def alpha(self, module: LoraModule) -> tuple[float | None, bool]:
        """(alpha, rs_lora) of a module: the file's ``.alpha`` tensor, else its PEFT config, else (None, False)."""
        key = module.keys.get("alpha")
        if key is not None:
            value = self.read(key)
            if value.numel() != 1:
                raise AdapterError(self.path, f"alpha must be a single number, got shape {tuple(value.shape)}", key)
            return float(value.float().item()), False
        peft = self._peft.get(module.part)
        if peft is not None and module.dotted:
            return peft.alpha_for(module.name), peft.use_rslora
        return None, False

    def delta_shapes(self, module: LoraModule) -> tuple[Shape, Shape | None]:
        try:
            return delta_shape(module.kind, self.shapes(module))
        except DeltaShapeError as exc:
            raise AdapterError(self.path, str(exc), module.keys.get(exc.role) or module.tensor_keys()[0]) from exc

    @property
    def format(self) -> str:
        labels: list[str] = []
        for m in self.modules:
            label = "diffusers-PEFT" if m.dotted else FORMAT_LABELS[m.kind]
            if label == "kohya LoRA" and ("mid" in m.keys or self.shape(m.keys["down"])[2:] not in ((), (1, 1))):
                label = "LoCon"  # a spatial (3x3) conv: LoRA for convolutions
            labels.append(label)
        found = list(dict.fromkeys(labels))
        if "LoCon" in found and "kohya LoRA" in found:
            found.remove("kohya LoRA")  # a LoCon file patches linear layers too
        return " + ".join(found)

    @property
    def family(self) -> Family:
        return _FAMILY[self._family_name()]

    def _family_name(self) -> str:
        meta = self.metadata
        base = meta.get("ss_base_model_version", "")
        parts = {m.part for m in self.modules}
        context, te_width = self._widths()
        # The SDXL refiner: its U-Net attends to bigG alone (1280 wide), and SAI's modelspec names its architecture.
        if meta.get("modelspec.architecture", "").startswith("stable-diffusion-xl-v1-refiner") or (
                context == 1280 and not any(m.stem.startswith("lora_te1_") for m in self.modules)):
            return "sdxl-refiner"
        # SDXL's two encoders: kohya's te1/te2 prefixes (even one alone), diffusers' text_encoder_2.
        if TEXT_ENCODER_2 in parts or base.startswith("sdxl") or any(
                m.stem.startswith(("lora_te1_", "lora_te2_")) or "label_emb" in m.name or "add_embedding" in m.name
                for m in self.modules):
            return "sdxl"
        if context == 2048:
            return "sdxl"
        if meta.get("ss_v2") == "True" or base.startswith("sd_v2") or context == 1024 or te_width == 1024:
            return "sd2"
        return "sd1"

    def _widths(self) -> tuple[int | None, int | None]:
        """(U-Net cross-attention input width, text-encoder width) as the file's shapes show them."""
        context = te_width = None
        for m in self.modules:
            spot = m.name.replace(".", "_")
            try:
                shape, _ = delta_shape(m.kind, self.shapes(m))
            except (DeltaShapeError, KeyError):
                continue  # a damaged module is reported when it is merged
            if m.part == UNET and spot.endswith(("attn2_to_k", "attn2_to_v")) and len(shape) == 2:
                context = shape[1]
            elif m.part == TEXT_ENCODER and spot.endswith(("self_attn_q_proj", "self_attn_to_q")) and len(shape) == 2:
                te_width = shape[1]
        return context, te_width


def as_adapter_error(exc: CheckpointError) -> AdapterError:
    """The same complaint about a LoRA file, as the adapters' error type."""
    text = str(exc)
    where = exc.path + (f" [key {exc.key!r}]" if exc.key else "") + ": "
    return AdapterError(exc.path, text[len(where):] if text.startswith(where) else text, exc.key)


def open_sd(path: str | os.PathLike[str]) -> StateDict:
    """safetensors memory-mapped; .pt/.bin/.ckpt only through weights-only unpickling (never a pickle's code)."""
    try:
        return open_state_dict(path, allow_pickle=True)
    except CheckpointError as exc:
        raise as_adapter_error(exc) from exc


def _parse_kohya(key: str) -> tuple[str, str, str, str | None, str] | None:
    """(stem, part, name, kind, role) of a kohya/LyCORIS key, or None if it is not spelled that way."""
    stem, _, suffix = key.partition(".")
    found = next(((prefix, part) for prefix, part in KOHYA_PREFIXES if stem.startswith(prefix)), None)
    if found is None or suffix not in KOHYA_ROLES:
        return None
    prefix, part = found
    kind, role = KOHYA_ROLES[suffix]
    return stem, part, stem[len(prefix):], kind, role


def _dotted_module(raw: str) -> tuple[str, str]:
    """(part, module path) of a diffusers/PEFT stem: component prefix off, attention-processor spelling undone."""
    raw = raw.removeprefix("base_model.model.")
    found = next(((prefix, part) for prefix, part in DOTTED_PREFIXES if raw.startswith(prefix)), None)
    if found is None:  # no component prefix: the oldest diffusers files (attention processors of the U-Net alone)
        part = TEXT_ENCODER if raw.startswith(("text_model.", "encoder.layers.")) else UNET
    else:
        part, raw = found[1], raw[len(found[0]):]
    head, _, last = raw.rpartition(".")
    if last.endswith("_lora"):  # "...attn1.processor.to_q_lora" (its alpha) -> "...attn1.to_q"
        last = last[: -len("_lora")]
    if last in PROCESSOR_NAMES.get(part, {}):
        # Only the processor format spells these so (current names end "to_out.0" and "q_proj").
        head = head.removesuffix(".processor")
        last = PROCESSOR_NAMES[part][last]
    return part, f"{head}.{last}" if head else last


def _parse_dotted(key: str) -> tuple[str, str, str, None, str] | None:
    for suffix, role in DOTTED_ROLES:
        if key.endswith(suffix) and len(key) > len(suffix):
            stem = key[: -len(suffix)]
            if suffix.startswith("_lora."):
                stem += "_lora"  # keep the file's spelling for listings; the module path drops it
            part, name = _dotted_module(stem)
            return stem, part, name, None, role
    return None


def _unsupported(key: str) -> str | None:
    if key.startswith(tuple(prefix for prefix, _ in KOHYA_PREFIXES)):
        return UNSUPPORTED.get(key.partition(".")[2])
    return next((what for name, what in UNSUPPORTED.items() if "_" in name and key.endswith("." + name)), None)


def looks_like_lora(keys: list[str]) -> bool:
    """Whether a file's keys are a LoRA's (not a checkpoint's, a VAE's or an embedding's): no tensor is read."""
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        return False
    return any(_parse_kohya(k) or (_parse_dotted(k) and not k.endswith(".alpha")) for k in keys)


def is_lora_file(path: str | os.PathLike[str]) -> bool:
    """Sniff a file by its keys only. Raises AdapterError for a file that cannot be opened at all."""
    p = Path(path)
    if p.suffix.lower() not in PICKLE_SUFFIXES:
        return looks_like_lora(list(open_sd(p)))
    # A pickle may hold nested dicts (A1111 embeddings: {"string_to_param": {...}}): read it without insisting
    # on a flat state dict, still weights-only.
    try:
        obj = load_weights_only(p)
    except Exception as exc:  # torch raises many types for bad pickles
        raise AdapterError(p, f"cannot be read as a weights-only file: {weights_only_refusal(exc)}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return isinstance(obj, dict) and looks_like_lora([str(k) for k in obj])


def _peft_alphas(path: Path, metadata: dict[str, str]) -> dict[str, PeftAlpha]:
    """Scaling settings from diffusers' metadata (``unet.lora_alpha``...) or a PEFT ``adapter_config.json``."""
    raw = metadata.get(PEFT_METADATA_KEY)
    found: dict[str, dict] = {}
    if raw:
        try:
            flat = json.loads(raw)
        except ValueError as exc:
            raise AdapterError(path, f"metadata {PEFT_METADATA_KEY} is not JSON ({exc})") from exc
        if isinstance(flat, dict):
            for k, v in flat.items():
                part, _, setting = str(k).partition(".")
                found.setdefault(part, {})[setting] = v
    elif path.stem == "adapter_model" and (path.parent / "adapter_config.json").is_file():
        try:
            config = json.loads((path.parent / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise AdapterError(path.parent / "adapter_config.json", f"cannot be read ({exc})") from exc
        if isinstance(config, dict):
            found = {UNET: config, TEXT_ENCODER: config}
    out: dict[str, PeftAlpha] = {}
    for part, cfg in found.items():
        try:
            alpha = cfg.get("lora_alpha")
            out[part] = PeftAlpha(None if alpha is None else float(alpha),
                                  {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
                                  bool(cfg.get("use_rslora", False)))
        except (TypeError, ValueError, AttributeError) as exc:
            raise AdapterError(path, f"LoRA config for {part} is not understood ({exc})") from exc
    return out


def open_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Open and normalise a LoRA-family file. AdapterError (naming the file and key) for anything not understood."""
    p = Path(path)
    sd = open_sd(p)
    groups: dict[tuple[str, str, bool], dict] = {}
    for key in sd:
        parsed = _parse_kohya(key)
        dotted = parsed is None
        if dotted and not key.startswith(tuple(prefix for prefix, _ in KOHYA_PREFIXES)):
            parsed = _parse_dotted(key)
        if parsed is None:
            what = _unsupported(key)
            if what:
                raise AdapterError(p, f"{what} is not supported", key)
            if any(key.startswith(c) for c in CHECKPOINT_PREFIXES):
                raise AdapterError(p, "this is a model checkpoint, not a LoRA", key)
            raise AdapterError(p, "not a LoRA tensor (unknown key)", key)
        stem, part, name, kind, role = parsed
        entry = groups.setdefault((part, name, dotted), {"stem": stem, "kinds": set(), "keys": {}})
        if role != "alpha":
            entry["stem"] = stem  # the file's own spelling of the module, from a weight rather than an alpha
        if kind is not None:
            entry["kinds"].add(kind)
        if role in entry["keys"]:
            raise AdapterError(p, f"two tensors for the same {role!r} of module {name!r}", key)
        entry["keys"][role] = key
    if not groups:
        raise AdapterError(p, "holds no tensors")
    modules = [_module(p, part, name, dotted, entry) for (part, name, dotted), entry in groups.items()]
    return LoraFile(p, sd, modules, _peft_alphas(p, sd.metadata))


def _module(path: Path, part: str, name: str, dotted: bool, entry: dict) -> LoraModule:
    keys: dict[str, str] = entry["keys"]
    kinds: set[str] = entry["kinds"] or ({"lora"} if dotted else set())
    some = next(iter(keys.values()))
    if len(kinds) != 1:
        if not kinds:
            raise AdapterError(path, "an alpha without the tensors it scales", some)
        raise AdapterError(path, f"one module mixes {' and '.join(sorted(kinds))} tensors", some)
    kind = kinds.pop()
    def spelled(role: str) -> str:  # a role as the file's trainer spells it
        if dotted:
            return {"down": "lora_A.weight", "up": "lora_B.weight", "up_bias": "lora_B.bias"}.get(role, role)
        return next((suffix for suffix, kr in KOHYA_ROLES.items() if kr == (kind, role)), role)

    for options in REQUIRED[kind]:
        if not any(o in keys for o in options):
            raise AdapterError(path, f"incomplete {FORMAT_LABELS[kind]} module: no {' / '.join(map(spelled, options))} tensor", some)
    allowed = {o for options in REQUIRED[kind] for o in options} | set(OPTIONAL[kind]) | {"alpha"}
    extra = sorted(set(keys) - allowed)
    if extra:
        raise AdapterError(path, f"{spelled(extra[0])!r} does not belong in a {FORMAT_LABELS[kind]} module", keys[extra[0]])
    if kind == "lokr":
        for side in ("w1", "w2"):
            if side not in keys and f"{side}b" not in keys:
                raise AdapterError(path, f"LoKr lokr_{side}_a without lokr_{side}_b", keys[f"{side}a"])
    return LoraModule(entry["stem"], part, name, dotted, kind, dict(keys))


# ---- describing ---------------------------------------------------------------------------------------------

TOP_TAGS = 10
MAX_META_CHARS = 300


@dataclass(frozen=True)
class LoraInfo:
    """What ``adforge models inspect`` shows about a LoRA file."""

    path: str
    format: str  # "kohya LoRA", "LoCon", "LoHa", "LoKr", "LyCORIS full", "diffusers-PEFT" (joined with " + ")
    family: str  # family row name: "sd1", "sd2", "sdxl"
    family_label: str  # "SD 1.x", "SD 2.x", "SDXL"
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]  # as stored; empty when the file has none (scale 1)
    unet_modules: int
    text_encoder_modules: int
    modules: tuple[str, ...]  # the file's module names (key prefixes)
    metadata: dict[str, str]  # training metadata (ss_*), ss_tag_frequency as its top tags


def _top_tags(raw: str) -> str:
    try:
        data = json.loads(raw)
        counts: Counter[str] = Counter()
        for tags in data.values():
            for tag, n in tags.items():
                counts[str(tag).strip()] += int(n)
    except (ValueError, AttributeError, TypeError):
        return raw[:MAX_META_CHARS]
    return ", ".join(f"{tag} ({n})" for tag, n in counts.most_common(TOP_TAGS))


def training_metadata(metadata: dict[str, str]) -> dict[str, str]:
    out = {}
    for k, v in sorted(metadata.items()):
        if not k.startswith("ss_"):
            continue
        v = _top_tags(v) if k == "ss_tag_frequency" else v
        out[k] = v if len(v) <= MAX_META_CHARS else v[:MAX_META_CHARS] + "..."
    return out


def describe_lora(path: str | os.PathLike[str]) -> LoraInfo:
    lora = open_lora(path)
    ranks = {r for m in lora.modules if (r := rank(m.kind, lora.shapes(m))) is not None}
    alphas = {a for m in lora.modules if (a := lora.alpha(m)[0]) is not None}
    family = lora.family
    return LoraInfo(
        path=str(lora.path),
        format=lora.format,
        family=family.name,
        family_label=family.label,
        ranks=tuple(sorted(ranks)),
        alphas=tuple(sorted(alphas)),
        unet_modules=sum(m.part == UNET for m in lora.modules),
        text_encoder_modules=sum(m.part in (TEXT_ENCODER, TEXT_ENCODER_2) for m in lora.modules),
        modules=tuple(m.stem for m in lora.modules),
        metadata=training_metadata(lora.metadata),
    )

"""Loading a checkpoint: building its networks from an opened file, on a device, in a dtype.

Only the families whose row in :mod:`engine.families` says ``supported`` get this far: today SD 1.x (UNet, CLIP
text encoder, VAE), plain or inpainting.

Networks are created on the meta device and then given the file's tensors with ``assign=True``: on the CPU in
the file's own dtype the parameters *are* the memory-mapped tensors (no copy), so loading a checkpoint costs
about one file size of memory, not two.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextModel

from engine.checkpoint import (
    CLIP_PREFIX,
    PICKLE_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    ShapeView,
    StateDict,
    a1111_short_hash,
    open_state_dict,
)
from engine.diffusers_folder import model_sha256, open_model
from engine.families import SD1, Family, detect_family
from engine.open_clip import (SD2_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_REFINER_CLIP_G_PREFIX, UNUSED, open_clip_config,
                              open_clip_source, open_clip_to_transformers)
from engine.text_encoder import (
    TextEncoderConfig,
    TextModel,
    build_text_encoder,
    reset_position_ids,
    text_encoder_config_from_state_dict,
)
from engine.tokenizer import ClipTokenizer, load_clip_tokenizer
from engine.unet import SD1_NUM_HEADS, UNetConfig, UNetModel, unet_config_from_state_dict
from engine.vae import AutoencoderKL, VAEConfig, normalize_vae_state_dict, vae_config_from_state_dict

# Optional safetensors metadata of ours: head counts are the one architecture fact no tensor shape carries.
META_UNET_HEADS = "adforge.unet.num_heads"
META_TEXT_HEADS = "adforge.text_encoder.num_heads"
META_NATIVE_SIZE = "adforge.native_size"
# Attention head width of an SD 2.x / SDXL-shaped U-Net of ours whose widths are not multiples of the family's 64.
META_UNET_HEAD_CHANNELS = "adforge.unet.head_channels"
SD1_NATIVE_SIZE = SD1.native_size


@dataclass(frozen=True)
class ModelFile:
    """Identity of a model file as it goes into infotext and the audit trail."""

    path: Path
    name: str
    sha256: str

    @property
    def short_hash(self) -> str:
        return a1111_short_hash(self.sha256)

    @classmethod
    def of(cls, path: str | os.PathLike[str], allow_pickle: bool = False) -> "ModelFile":
        p = Path(path)
        # a folder's name has no suffix to drop ("sdxl-base-1.0"); a pickled folder is hashed as it was opened
        return cls(path=p, name=p.name if p.is_dir() else p.stem, sha256=model_sha256(p, allow_pickle))


# ---- base weights: undoing in-place changes (LoRA merges) ---------------------------------------------------

class BaseWeights:
    """Where the weights a model was loaded with can be had again, so that in-place changes (merged LoRAs) can be
    undone exactly. Parts are "unet" and "text_encoder"; names are parameter names inside that network.

    This fallback keeps a copy in memory of each parameter before its first change (models read from pickles or
    built in memory have no file to re-read); :class:`SafetensorsBaseWeights` re-reads the file instead and keeps
    nothing.
    """

    def __init__(self) -> None:
        self._saved: dict[tuple[str, str], torch.Tensor] = {}

    def check(self) -> None:
        """Raise if the base weights can no longer be had (called before anything is changed)."""

    def remember(self, part: str, name: str, current: torch.Tensor) -> None:
        """Called before a parameter is changed in place: the first call per parameter keeps its value."""
        self._saved.setdefault((part, name), current.detach().clone())

    def read(self, part: str, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The base value of each parameter (any dtype/device: the caller casts it as loading did)."""
        for name in names:
            yield name, self._saved[(part, name)]

    def forget(self, part: str, name: str) -> None:
        """The parameter is back at its base value: nothing needs keeping for it."""
        self._saved.pop((part, name), None)


# safetensors dtype names -> torch dtypes (the header's "dtype" field).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsBaseWeights(BaseWeights):
    """Base weights re-read from the safetensors checkpoint they were loaded from, tensor by tensor with plain
    file reads (not a memory map, which would keep every page read resident in this process until unmapped).
    The file's size and mtime at load time are checked before every read: a file replaced since is refused."""

    def __init__(self, path: Path, keys: Mapping[str, Mapping[str, str]], stamp: tuple[int, int]):
        super().__init__()
        self.path = path
        self.keys = {part: dict(k) for part, k in keys.items()}  # part -> parameter name -> full key in the file
        self._stamp = stamp  # (size, mtime_ns) when the file was opened for loading
        self._header: dict | None = None
        self._data_start = 0

    @staticmethod
    def stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot re-read the base weights ({exc})") from exc
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise CheckpointError(self.path, "the checkpoint file changed since it was loaded, so its base weights "
                                             "cannot be re-read; load the model again")

    def remember(self, part: str, name: str, current: torch.Tensor) -> None:
        if name not in self.keys.get(part, {}):
            super().remember(part, name, current)  # not from the file (cannot happen for a strictly loaded model)

    def read(self, part: str, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        self.check()
        with self.path.open("rb") as f:
            if self._header is None:
                (n,) = struct.unpack("<Q", f.read(8))
                self._header = json.loads(f.read(n))
                self._data_start = 8 + n
            for name in names:
                full = self.keys.get(part, {}).get(name)
                if full is None:
                    yield from super().read(part, [name])
                    continue
                info = self._header[full]
                start, end = info["data_offsets"]
                buf = bytearray(end - start)
                f.seek(self._data_start + start)
                if f.readinto(buf) != len(buf):
                    raise CheckpointError(self.path, "file ends early while re-reading base weights", full)
                tensor = torch.frombuffer(buf, dtype=_SAFETENSORS_DTYPES[info["dtype"]]) if buf else torch.empty(0)
                yield name, tensor.reshape(info["shape"])


@dataclass
class LoadedModels:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextModel  # SDXL: CLIP-L
    tokenizer: ClipTokenizer
    family: Family
    checkpoint: ModelFile
    vae_file: ModelFile | None
    device: torch.device
    dtype: torch.dtype
    # The resolution the model was trained at: the family's, or what our own files record in metadata.
    native_size: int = SD1_NATIVE_SIZE
    # Where the U-Net's and text encoder's loaded weights can be had again (to undo merged LoRAs).
    base_weights: BaseWeights = field(default_factory=BaseWeights)
    # What the U-Net predicts: "eps" (the noise) or "v"; the family's, a file's declaration, or the caller's override.
    prediction: str = "eps"
    # SDXL's second text encoder (OpenCLIP bigG, with its projection for the pooled output); None for one-encoder families.
    text_encoder_2: TextModel | None = None

    @property
    def is_inpainting(self) -> bool:
        return self.family.inpainting


def _prefixed(sd: StateDict, prefix: str) -> Mapping[str, str]:
    """Map of stripped name -> full key for one sub-model."""
    return {k[len(prefix):]: k for k in sd if k.startswith(prefix)}


def _materialize(
    factory: Callable[[], nn.Module],
    source: StateDict,
    keys: Mapping[str, str],
    device: torch.device,
    dtype: torch.dtype,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ignore: Callable[[str], bool] = lambda k: False,
    source_key: Callable[[str], str] | None = None,
) -> nn.Module:
    """``source_key`` names the file's key of a network tensor in errors when ``transform`` renames them."""
    try:
        with torch.device("meta"):
            module = factory()
    except ValueError as exc:  # an architecture the shapes imply but that cannot be built (e.g. widths vs heads)
        raise CheckpointError(source.path, f"cannot build the network its tensors describe: {exc}") from None
    expected = module.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    if transform is None:  # with a transform the file's names are not the network's: checked after it
        for name in expected:
            if name not in keys:
                raise CheckpointError(source.path, "missing tensor", _full_key(keys, name))
    for name, full in keys.items():
        if name in expected or transform is not None:
            tensors[name] = source[full]
    if transform is not None:
        tensors = transform(tensors)
    state: dict[str, torch.Tensor] = {}
    for name, want in expected.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(source.path, "missing tensor", source_key(name) if source_key else _full_key(keys, name))
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                source.path,
                f"shape {tuple(t.shape)} does not match the architecture's {tuple(want.shape)}"
                + _pair_note(source, keys, name),
                keys.get(name, name),
            )
        target_dtype = dtype if t.is_floating_point() else t.dtype
        state[name] = t.to(device=device, dtype=target_dtype)
    # Without a transform only the expected names were read: judge the file's own names, or extra tensors
    # (e.g. a block the inferred architecture lacks) would be dropped silently.
    unexpected = [n for n in (tensors if transform is not None else keys) if n not in expected and not ignore(n)]
    if unexpected:
        raise CheckpointError(source.path, "unexpected tensor for this architecture", keys.get(unexpected[0], unexpected[0]))
    module.load_state_dict(state, strict=True, assign=True)
    module.eval().requires_grad_(False)
    return module


# Every ``X.bias`` of these networks (conv, linear, norm) comes with an ``X.weight`` of as many outputs. Weight
# shapes define the inferred architecture, so a missing or damaged weight would otherwise be misread as another
# architecture and the error would blame some other tensor.


def _check_missing_weights(sd: StateDict, keys: Mapping[str, str]) -> None:
    """Before config inference: a bias without its weight names the missing weight."""
    for name, full in keys.items():
        if name.endswith(".bias") and name[: -len("bias")] + "weight" not in keys:
            raise CheckpointError(sd.path, "missing tensor", full[: -len("bias")] + "weight")


def _pair_note(sd: StateDict, keys: Mapping[str, str], name: str) -> str:
    """If ``name`` disagrees with its weight/bias partner, a note naming the partner (either may be damaged)."""
    stem, _, last = name.rpartition(".")
    partner = {"weight": f"{stem}.bias", "bias": f"{stem}.weight"}.get(last)
    if partner is None or partner not in keys or name not in keys:
        return ""
    shape, other = sd.shape(keys[name]), sd.shape(keys[partner])
    w, b = (shape, other) if last == "weight" else (other, shape)
    if len(b) == 1 and w and w[0] == b[0]:
        return ""
    return f"; it disagrees with {keys[partner]!r} of shape {other}, so one of the two is damaged"


def _check_pairs_consistent(sd: StateDict, keys: Mapping[str, str]) -> None:
    """After config inference failed: name a weight whose shape disagrees with its bias, if there is one."""
    for name, full in keys.items():
        if name.endswith(".weight"):
            note = _pair_note(sd, keys, name)
            if note:
                raise CheckpointError(sd.path, f"shape {sd.shape(full)}{note}", full)


def _full_key(keys: Mapping[str, str], name: str) -> str:
    if keys:
        some_full, some_name = next(iter(keys.values())), next(iter(keys))
        prefix = some_full[: len(some_full) - len(some_name)]
        return prefix + name
    return name


def _heads(sd: StateDict, key: str, default: int | None) -> int | None:
    raw = sd.metadata.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise CheckpointError(sd.path, f"metadata {key}={raw!r} is not an integer") from exc


def _config(sd: StateDict, what: str, fn: Callable[[], object], keys: Mapping[str, str]):
    """Run config inference over prefix-stripped names; errors name the file's full keys."""
    try:
        return fn()
    except KeyError as exc:
        _check_pairs_consistent(sd, keys)  # a damaged shape is the likelier cause: name it if it shows
        raw = str(exc.args[0]) if exc.args else ""
        # Some inference code raises KeyError with a sentence that quotes the stripped name.
        quoted = re.search(r"'([^']+)'", raw) if " " in raw else None
        name = quoted.group(1) if quoted else raw
        raise CheckpointError(sd.path, f"missing tensor needed to read the {what} architecture", _full_key(keys, name)) from exc
    except ValueError as exc:
        _check_pairs_consistent(sd, keys)
        raise CheckpointError(sd.path, f"{what} (tensors '{_full_key(keys, '')}*'): {exc}") from exc


def load_unet(sd: StateDict, device: torch.device, dtype: torch.dtype, family: Family = SD1) -> UNetModel:
    view = ShapeView(sd, UNET_PREFIX)
    keys = _prefixed(sd, UNET_PREFIX)
    _check_missing_weights(sd, keys)
    heads = _heads(sd, META_UNET_HEADS, SD1_NUM_HEADS) or SD1_NUM_HEADS
    head_channels = _heads(sd, META_UNET_HEAD_CHANNELS, family.head_channels)
    cfg: UNetConfig = _config(
        sd, "U-Net", lambda: unet_config_from_state_dict(view, heads, num_head_channels=head_channels), keys)
    return _materialize(lambda: UNetModel(cfg), sd, keys, device, dtype)  # type: ignore[return-value]


def _clip_keys(sd: StateDict, prefix: str = CLIP_PREFIX) -> dict[str, str]:
    # Newer files: cond_stage_model.transformer.text_model.X; older ones: cond_stage_model.transformer.X.
    keys = _prefixed(sd, prefix + "text_model.") or _prefixed(sd, prefix)
    return {k: v for k, v in keys.items() if k != "embeddings.position_ids"}


def load_open_clip(sd: StateDict, prefix: str, device: torch.device, dtype: torch.dtype, *, with_projection: bool) -> TextModel:
    """An OpenCLIP text tower (SD 2.x ViT-H, SDXL bigG) converted at load time to transformers' names; the split
    q/k/v are views of the file's fused ``in_proj`` (no copy on the CPU in the file's dtype)."""
    keys = {name: full for name, full in _prefixed(sd, prefix).items() if name not in UNUSED}
    if not with_projection:
        keys.pop("text_projection", None)
    if not keys:
        raise CheckpointError(sd.path, f"no OpenCLIP text encoder ('{prefix}*' tensors)")
    _check_missing_weights(sd, keys)
    shapes = {name: torch.empty(sd.shape(full), device="meta") for name, full in keys.items()}
    cfg: TextEncoderConfig = _config(sd, "text encoder", lambda: open_clip_config(
        shapes, num_heads=_heads(sd, META_TEXT_HEADS, None), with_projection=with_projection), keys)
    model = _materialize(lambda: build_text_encoder(cfg), sd, keys, device, dtype,
                         transform=lambda t: open_clip_to_transformers(t, with_projection=with_projection),
                         ignore=lambda n: n.endswith("position_ids"), source_key=lambda n: prefix + open_clip_source(n).key)
    reset_position_ids(model, device)  # type: ignore[arg-type]
    return model  # type: ignore[return-value]


def load_text_encoder(sd: StateDict, device: torch.device, dtype: torch.dtype, prefix: str = CLIP_PREFIX) -> CLIPTextModel:
    """A CLIP-L text encoder in transformers' layout under ``prefix`` (SD 1.x; SDXL's first encoder)."""
    keys = _clip_keys(sd, prefix)
    if not keys:
        raise CheckpointError(sd.path, f"no CLIP text encoder ('{prefix}*' tensors)")
    _check_missing_weights(sd, keys)
    shapes = {name: torch.empty(sd.shape(full), device="meta") for name, full in keys.items()}
    cfg: TextEncoderConfig = _config(
        sd, "text encoder", lambda: text_encoder_config_from_state_dict(shapes, _heads(sd, META_TEXT_HEADS, None)), keys
    )
    model = _materialize(lambda: build_text_encoder(cfg), sd, keys, device, dtype, ignore=lambda n: n == "embeddings.position_ids")
    reset_position_ids(model, device)  # type: ignore[arg-type]
    return model  # type: ignore[return-value]


def load_vae(sd: StateDict, prefix: str, device: torch.device, dtype: torch.dtype, family: Family = SD1) -> AutoencoderKL:
    keys = {k: v for k, v in _prefixed(sd, prefix).items() if k.split(".")[0] in {"encoder", "decoder", "quant_conv", "post_quant_conv"}}
    if not keys:
        raise CheckpointError(sd.path, f"no VAE tensors ('{prefix}encoder.*', '{prefix}decoder.*')")
    _check_missing_weights(sd, keys)
    shapes = normalize_vae_state_dict({n: torch.empty(sd.shape(f), device="meta") for n, f in keys.items()})
    cfg: VAEConfig = _config(sd, "VAE", lambda: vae_config_from_state_dict(shapes, scaling_factor=family.latent_scale), keys)
    return _materialize(  # type: ignore[return-value]
        lambda: AutoencoderKL(cfg), sd, keys, device, dtype, transform=normalize_vae_state_dict
    )


def load_standalone_vae(
    path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype, allow_pickle: bool, family: Family = SD1
) -> AutoencoderKL:
    sd = open_state_dict(path, allow_pickle)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in sd) else ""
    return load_vae(sd, prefix, device, dtype, family)


PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}
# SD 2.0-base, the one eps model of SD 2.x that is not for inpainting, was saved at this step; diffusers uses the same
# clue. Every other SD 2.x text-to-image release (2.0-v, 2.1, 2.1-base) predicts v.
SD2_EPS_GLOBAL_STEP = 875000


def resolve_prediction(sd: StateDict, family: Family, override: str | None = None) -> str:
    """What the U-Net predicts ("eps" or "v"), by this rule: the caller's ``override``; else the file's own
    declaration (metadata ``modelspec.prediction_type`` or ``adforge.prediction``); else, for SD 2.x text-to-image
    files, ``eps`` only when the file records SD 2.0-base's ``global_step`` (875000) and ``v`` otherwise; else the
    family's (SD 1.x, SD 2 inpainting and SDXL: eps)."""
    for raw, where in ((override, "the prediction override"), (sd.metadata.get("modelspec.prediction_type"), "metadata"),
                       (sd.metadata.get("adforge.prediction"), "metadata")):
        if raw:
            value = PREDICTIONS.get(str(raw).strip().lower())
            if value is None:
                raise CheckpointError(sd.path, f"{where} says prediction {raw!r}; expected eps or v")
            return value
    if family.name == "sd2":
        if "global_step" in sd:
            try:
                if int(sd["global_step"].reshape(-1)[0]) == SD2_EPS_GLOBAL_STEP:
                    return "eps"
            except (RuntimeError, ValueError, IndexError):
                pass
        return "v"
    return family.prediction


SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."


def _load_text_encoders(sd: StateDict, family: Family, device: torch.device, dtype: torch.dtype
                        ) -> tuple[TextModel, TextModel | None, dict[str, str]]:
    """The family's text encoder(s), and the file keys of the ones whose tensors map 1:1 to the file (what
    re-reading base weights after a LoRA can use; the OpenCLIP towers' q/k/v are slices of a fused tensor)."""
    kinds = family.text_encoders
    if kinds == ("clip-l",):
        return load_text_encoder(sd, device, dtype), None, _clip_keys(sd)
    if kinds == ("openclip-h",):
        return load_open_clip(sd, SD2_PREFIX, device, dtype, with_projection=False), None, {}
    if kinds == ("clip-l", "openclip-bigg"):
        clip_l = load_text_encoder(sd, device, dtype, prefix=SDXL_CLIP_L_PREFIX)
        clip_g = load_open_clip(sd, SDXL_CLIP_G_PREFIX, device, dtype, with_projection=True)
        return clip_l, clip_g, _clip_keys(sd, SDXL_CLIP_L_PREFIX)
    if kinds == ("openclip-bigg",):  # the SDXL refiner: bigG alone, as its first embedder
        return load_open_clip(sd, SDXL_REFINER_CLIP_G_PREFIX, device, dtype, with_projection=True), None, {}
    raise CheckpointError(sd.path, f"{family.label} ({family.name}) text encoders {kinds} cannot be loaded yet")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    vae_path: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    prediction: str | None = None,
) -> LoadedModels:
    """Load a single-file checkpoint of a supported family (and optionally a separate VAE file). ``prediction``
    ("eps" / "v") overrides what :func:`resolve_prediction` decides from the file."""
    device = torch.device(device)
    sd = open_model(path, allow_pickle)  # a single file, or a diffusers folder read in the single-file layout
    stamp = SafetensorsBaseWeights.stamp(Path(path))
    detection = detect_family(sd)
    if detection.family is None or not detection.supported:
        raise CheckpointError(sd.path, detection.reason)
    family = detection.family
    predicts = resolve_prediction(sd, family, prediction)
    unet = load_unet(sd, device, dtype, family)
    text_encoder, text_encoder_2, text_keys = _load_text_encoders(sd, family, device, dtype)
    width = text_encoder.config.hidden_size + (text_encoder_2.config.hidden_size if text_encoder_2 is not None else 0)
    if width != unet.config.context_dim:
        raise CheckpointError(
            sd.path,
            f"the text encoder{'s are' if text_encoder_2 is not None else ' is'} {width} wide but the U-Net's "
            f"cross-attention expects {unet.config.context_dim}: the file mixes parts of different models",
        )
    vae = (load_standalone_vae(vae_path, device, dtype, allow_pickle, family) if vae_path
           else load_vae(sd, VAE_PREFIX, device, dtype, family))
    base: BaseWeights = BaseWeights()  # pickles: keep originals in memory on first change
    if Path(path).is_file() and Path(path).suffix.lower() not in PICKLE_SUFFIXES:  # folders: kept in memory on change
        base = SafetensorsBaseWeights(Path(path).absolute(), {"unet": _prefixed(sd, UNET_PREFIX), "text_encoder": text_keys}, stamp)
    # SD 2.x's eps text-to-image release is the 512 px base; its v models (and the table's row) are 768.
    default_size = 512 if family.name == "sd2" and predicts == "eps" else family.native_size
    return LoadedModels(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(),
        family=family,
        checkpoint=ModelFile.of(path, allow_pickle),
        vae_file=ModelFile.of(vae_path) if vae_path else None,
        device=device,
        dtype=dtype,
        native_size=_heads(sd, META_NATIVE_SIZE, default_size) or default_size,
        base_weights=base,
        prediction=predicts,
    )

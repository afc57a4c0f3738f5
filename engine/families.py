"""Model families as data: what each Stable Diffusion generation is, and how a checkpoint shows which one it holds.

A family is a row of :data:`FAMILIES`. Detection reads a few key prefixes and tensor shapes from a file
(:class:`DetectedConfig`, without loading a tensor) and takes the first row one of whose signatures fits. A new
family is a new row; once it renders, its row says ``supported=True`` and the loader learns its networks.

Row values follow the published configs (Stability-AI's SD 1.x/2.x yaml files and generative-models); see
DESIGN.md "Engine facts" and "Family facts".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from engine.checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointError, StateDict

__all__ = [
    "ANY", "FAMILIES", "SD1", "DetectedConfig", "Detection", "Family", "Signature", "detect_family", "infer_config",
]

# The tensors detection reads, by their full keys so that errors name them as the file does.
CROSS_ATTN_KEY = f"{UNET_PREFIX}middle_block.1.transformer_blocks.0.attn2.to_k.weight"
PROJ_IN_KEY = f"{UNET_PREFIX}middle_block.1.proj_in.weight"
CONV_IN_KEY = f"{UNET_PREFIX}input_blocks.0.0.weight"
LABEL_EMB_KEY = f"{UNET_PREFIX}label_emb.0.0.weight"

# Text encoder kinds by where a file keeps them. The layout says which OpenCLIP it is: SD 2.x ships ViT-H in the
# LDM layout, SDXL ships bigG in the SGM ("conditioner") layout.
TEXT_ENCODER_PREFIXES = (
    ("cond_stage_model.transformer.", "clip-l"),
    ("cond_stage_model.model.", "openclip-h"),
    ("conditioner.embedders.0.transformer.", "clip-l"),
    ("conditioner.embedders.0.model.", "openclip-bigg"),
    ("conditioner.embedders.1.model.", "openclip-bigg"),
)


@dataclass(frozen=True)
class DetectedConfig:
    """What a checkpoint's keys and shapes say about its architecture; None where the tensor is absent."""

    has_unet: bool
    conditioner: bool  # SGM layout (``conditioner.embedders.N.*``), which only SDXL files use
    text_encoders: tuple[str, ...]
    adm_in_channels: int | None  # width of the U-Net's extra (pooled text, size) conditioning: ``label_emb``
    context_dim: int | None
    linear_proj: bool | None  # SpatialTransformer proj_in as Linear (2-D weight) instead of a 1x1 conv
    model_channels: int | None
    in_channels: int | None


class _Any:
    def __repr__(self) -> str:
        return "ANY"


# In a signature: the value must be known (its tensor is in the file), whatever it is.
ANY = _Any()
_CONFIG_FIELDS = frozenset(f.name for f in fields(DetectedConfig))


@dataclass(frozen=True)
class Signature:
    """Evidence that identifies a family: each named field of the detected config has that value (or, for ANY,
    is known at all). ``note`` says what gave the family away, and goes into the refusal."""

    values: tuple[tuple[str, object], ...]
    note: str = ""

    @classmethod
    def of(cls, note: str = "", **values: object) -> "Signature":
        unknown = set(values) - _CONFIG_FIELDS
        if unknown:
            raise ValueError(f"signature names unknown fields {sorted(unknown)}")
        return cls(tuple(values.items()), note)

    def fits(self, config: DetectedConfig) -> bool:
        for name, want in self.values:
            got = getattr(config, name)
            if got is None or (want is not ANY and got != want):
                return False
        return True


@dataclass(frozen=True)
class Family:
    """One row of the family table: what the loader and the pipeline need to know about a model generation."""

    name: str  # recorded with every registered model; shown by `adforge models inspect`
    label: str  # what users call the family, in messages
    latent_channels: int
    latent_scale: float  # the VAE's scaling factor: not stored in the weights
    context_dim: int  # width of the text conditioning the U-Net cross-attends to
    prediction: str  # what the U-Net predicts: "eps" (the noise) or "v"
    text_encoders: tuple[str, ...]
    native_size: int  # training resolution in pixels
    inpainting: bool = False  # U-Net input: latent + mask + masked-image latent
    supported: bool = False  # rendered by this engine today
    # Attention heads are this many channels wide (SD 2.x, SDXL); None: a fixed head count (SD 1.x: 8). No tensor
    # shape carries it, so the table does.
    head_channels: int | None = None
    signatures: tuple[Signature, ...] = ()

    @property
    def unet_in_channels(self) -> int:
        return 2 * self.latent_channels + 1 if self.inpainting else self.latent_channels


# Detection takes the first row that fits, so the order matters: SD 1.x's signatures are the loosest (the bundled
# model and the test models are SD 1.x of any width), so the rows that newer families' evidence picks out come
# first, and the SDXL refiner before SDXL, whose "conditioner" layout it shares.
# Columns: name, label, latent channels, latent scale, context dim, prediction, text encoders, native size.
FAMILIES: tuple[Family, ...] = (
    Family(
        "sdxl-refiner", "SDXL refiner", 4, 0.13025, 1280, "eps", ("openclip-bigg",), 1024, head_channels=64,
        supported=True,
        signatures=(
            Signature.of(adm_in_channels=2560),
            Signature.of(conditioner=True, text_encoders=("openclip-bigg",)),
        ),
    ),
    Family(
        "sdxl-inpaint", "SDXL", 4, 0.13025, 2048, "eps", ("clip-l", "openclip-bigg"), 1024, inpainting=True,
        head_channels=64, supported=True,
        signatures=(
            Signature.of(conditioner=True, in_channels=9, note="inpainting"),
            Signature.of(adm_in_channels=2816, in_channels=9),
        ),
    ),
    Family(
        "sdxl", "SDXL", 4, 0.13025, 2048, "eps", ("clip-l", "openclip-bigg"), 1024, head_channels=64, supported=True,
        signatures=(
            Signature.of(conditioner=True),
            Signature.of(adm_in_channels=ANY),
            Signature.of(context_dim=2048, linear_proj=ANY),
        ),
    ),
    Family(
        "sd2-inpaint", "SD 2.x", 4, 0.18215, 1024, "eps", ("openclip-h",), 512, inpainting=True, head_channels=64,
        supported=True,
        signatures=(
            Signature.of(text_encoders=("openclip-h",), in_channels=9, note="OpenCLIP text encoder, inpainting"),
            Signature.of(context_dim=1024, in_channels=9),
        ),
    ),
    # 768-v files share every shape with the 512 eps ones and no key says which they are (A1111 reads the yaml
    # beside the file): engine.loading.resolve_prediction decides, and the choice is recorded with the model.
    Family(
        "sd2", "SD 2.x", 4, 0.18215, 1024, "v", ("openclip-h",), 768, head_channels=64, supported=True,
        signatures=(
            Signature.of(has_unet=True, text_encoders=("openclip-h",), note="OpenCLIP text encoder"),
            Signature.of(context_dim=1024, linear_proj=ANY),
            Signature.of(context_dim=ANY, linear_proj=True),
        ),
    ),
    Family(
        "sd1-inpaint", "SD 1.x", 4, 0.18215, 768, "eps", ("clip-l",), 512, inpainting=True, supported=True,
        signatures=(Signature.of(context_dim=ANY, linear_proj=False, in_channels=9),),
    ),
    Family(
        "sd1", "SD 1.x", 4, 0.18215, 768, "eps", ("clip-l",), 512, supported=True,
        signatures=(Signature.of(context_dim=ANY, linear_proj=False, in_channels=4),),
    ),
)
SD1 = next(f for f in FAMILIES if f.name == "sd1")


@dataclass(frozen=True)
class Detection:
    """What a file was found to be: a family row, or (``family`` None) something that is no checkpoint we know."""

    name: str
    family: Family | None
    reason: str = ""  # why it cannot be rendered; empty when it can

    @property
    def supported(self) -> bool:
        return self.family is not None and self.family.supported


def _dim(sd: StateDict, key: str, axis: int) -> int | None:
    if key not in sd:
        return None
    shape = sd.shape(key)
    return int(shape[axis]) if len(shape) > axis else None


def infer_config(sd: StateDict) -> DetectedConfig:
    """Read the evidence detection needs from keys and shapes only (no tensor is loaded)."""
    keys = list(sd)
    proj = sd.shape(PROJ_IN_KEY) if PROJ_IN_KEY in sd else None
    return DetectedConfig(
        has_unet=any(k.startswith(UNET_PREFIX) for k in keys),
        conditioner=any(k.startswith("conditioner.embedders.") for k in keys),
        text_encoders=tuple(kind for prefix, kind in TEXT_ENCODER_PREFIXES if any(k.startswith(prefix) for k in keys)),
        adm_in_channels=_dim(sd, LABEL_EMB_KEY, 1),
        context_dim=_dim(sd, CROSS_ATTN_KEY, 1),
        linear_proj=None if proj is None else len(proj) == 2,
        model_channels=_dim(sd, CONV_IN_KEY, 0),
        in_channels=_dim(sd, CONV_IN_KEY, 1),
    )


def _refusal(family: Family, note: str) -> str:
    supported = " / ".join(dict.fromkeys(f.label for f in FAMILIES if f.supported))
    return f"{family.label} checkpoints{f' ({note})' if note else ''} are not supported yet ({supported} only)"


def detect_family(sd: StateDict) -> Detection:
    """The family of an opened file. Raises CheckpointError for a file that is no model at all, or whose U-Net
    lacks a tensor detection needs."""
    config = infer_config(sd)
    for family in FAMILIES:
        for signature in family.signatures:
            if signature.fits(config):
                return Detection(family.name, family, "" if family.supported else _refusal(family, signature.note))
    return _explain_no_match(sd, config)


def _explain_no_match(sd: StateDict, config: DetectedConfig) -> Detection:
    keys = sd
    if not config.has_unet:
        if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
            return Detection("lora", None, f"this is a LoRA file, not a checkpoint: put it in the LoRA folder (models/loras) "
                                           f"and name it in a prompt, <lora:{sd.path.stem}:1>")
        if any(k.startswith(("encoder.", "decoder.", f"{VAE_PREFIX}encoder.", f"{VAE_PREFIX}decoder.")) for k in keys):
            return Detection("vae", None, "this is a standalone VAE; pass it with --vae alongside a checkpoint")
        raise CheckpointError(sd.path, f"not a Stable Diffusion checkpoint: no '{UNET_PREFIX}*' tensors")
    for key in (CROSS_ATTN_KEY, PROJ_IN_KEY):
        if key not in keys:
            raise CheckpointError(sd.path, "missing tensor of the U-Net's cross-attention middle block", key)
    if config.context_dim is None:
        shape = sd.shape(CROSS_ATTN_KEY)
        raise CheckpointError(sd.path, f"shape {shape} is not a cross-attention projection", CROSS_ATTN_KEY)
    if CONV_IN_KEY not in keys:
        raise CheckpointError(sd.path, "missing tensor", CONV_IN_KEY)
    n = config.in_channels
    if n is None:
        raise CheckpointError(sd.path, f"shape {sd.shape(CONV_IN_KEY)} is not a convolution", CONV_IN_KEY)
    return Detection(f"sd1-{n}ch", None, f"U-Net with {n} input channels (e.g. instruct-pix2pix) is not supported")

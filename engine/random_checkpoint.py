"""Random-weight checkpoints in the real single-file layouts: SD 1.x, SD 2.x (eps or v), SDXL base.

For smoke tests of a machine, benchmarks at real shapes, and the test suite's tiny models: the file goes through
exactly the loader a downloaded checkpoint does. The images it renders are noise by design.

Each family has two presets: ``tiny`` (the family's topology at narrow widths: a few MB, renders 64x64 in
milliseconds) and ``full`` (the published shapes: SD 1.5, SD 2.1, SDXL base; gigabytes, written only when asked).
Tiny widths are not multiples of the real 64-wide attention heads, so our files record heads in metadata.

:func:`write_random` streams: one network at a time is filled and written (:class:`SafetensorsWriter`), so a full
SDXL file costs about its U-Net's size in memory, not the file's; the tensors are the ones :func:`random_state_dict`
makes for the same arguments, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from engine.checkpoint_writer import (
    SafetensorsWriter,
    checkpoint_metadata,
    save_sd1_checkpoint,
    sd1_state_dict,
    sd2_state_dict,
    sdxl_state_dict,
)
from engine.loading import META_NATIVE_SIZE, META_TEXT_HEADS, META_UNET_HEADS
from engine.text_encoder import TextEncoderConfig, TextModel, build_text_encoder, reset_position_ids
from engine.unet import UNetConfig, UNetModel
from engine.vae import AutoencoderKL, VAEConfig

__all__ = [
    "FAMILY_NAMES", "PRESETS", "PRESET_NAMES", "RandomModels", "RandomSpec", "TINY_TEXT", "TINY_UNET", "TINY_VAE",
    "models_state_dict", "random_metadata", "random_models", "random_sd1_models", "random_sd1_state_dict", "random_spec",
    "random_state_dict", "randomize_", "sd1_metadata", "write_random", "write_random_sd1", "write_random_spec",
]

# Same topology as SD 1.5 (two U-Net levels instead of four, narrow widths): loads and renders in milliseconds.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=8, context_dim=32)
TINY_TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=2)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

PRESETS: dict[str, tuple[UNetConfig, TextEncoderConfig, VAEConfig]] = {
    "tiny": (TINY_UNET, TINY_TEXT, TINY_VAE),
    "sd15": (UNetConfig(), TextEncoderConfig(), VAEConfig()),  # the real SD 1.5 shapes (~4.3 GB in float32)
}

SDXL_LATENT_SCALE = 0.13025
# SDXL's y: the pooled bigG output, then six size numbers each embedded 256 wide (engine.unet.sdxl_size_embedding).
SDXL_SIZE_FEATURES = 6 * 256


@dataclass(frozen=True)
class RandomSpec:
    """The networks of one family at one preset. ``text_2`` is SDXL's bigG (with ``projection_dim``);
    ``projection_dim`` alone is SD 2.x's unused OpenCLIP projection width, written for the layout's sake."""

    family: str  # engine.families row name of the text-to-image model ("sd1", "sd2", "sdxl")
    unet: UNetConfig
    text: TextEncoderConfig
    vae: VAEConfig
    text_2: TextEncoderConfig | None = None
    projection_dim: int | None = None
    prediction: str = "eps"  # "eps" or "v", declared in the file's metadata (SD 1.x files declare nothing)
    native_size: int = 512


_OPEN_CLIP_H = TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, hidden_act="gelu")
_BIG_G = TextEncoderConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
                           projection_dim=1280)
# Tiny OpenCLIP towers: three layers (so the penultimate layer SD 2.x / SDXL read is not the first), an MLP that is not
# 4x the width and a projection narrower than the width (a transposed tensor cannot pass), the same two heads as the
# tiny CLIP-L (the loader reads one head count for all of a file's text encoders).
_TINY_OPEN_CLIP = TextEncoderConfig(hidden_size=32, intermediate_size=72, num_layers=3, num_heads=2, hidden_act="gelu")
# SDXL's two towers have different widths, so that a swapped concatenation shows.
_TINY_SDXL_L = replace(TINY_TEXT, hidden_size=16, num_layers=3)
_TINY_G_PROJECTION = 24
_TINY_BIG_G = replace(_TINY_OPEN_CLIP, projection_dim=_TINY_G_PROJECTION)
TINY_NATIVE_SIZE = 128

_SPECS: dict[tuple[str, str], RandomSpec] = {
    ("sd1", "tiny"): RandomSpec("sd1", TINY_UNET, TINY_TEXT, TINY_VAE, native_size=TINY_NATIVE_SIZE),
    ("sd1", "full"): RandomSpec("sd1", *PRESETS["sd15"]),
    # SD 2.x: heads sized by width (8-wide here, 64 in the real model), Linear proj_in/out, attention at every level.
    ("sd2", "tiny"): RandomSpec(
        "sd2", UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          num_head_channels=8, context_dim=32, use_linear_in_transformer=True),
        _TINY_OPEN_CLIP, TINY_VAE, projection_dim=24, native_size=TINY_NATIVE_SIZE),
    ("sd2", "full"): RandomSpec(  # SD 2.1 (and 2.1-base: the same shapes)
        "sd2", UNetConfig(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True), _OPEN_CLIP_H,
        VAEConfig(), projection_dim=1024),
    # SDXL: no attention at full resolution, deeper transformers further down, y = pooled bigG + size embedding.
    ("sdxl", "tiny"): RandomSpec(
        "sdxl", UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, num_head_channels=16,
                           context_dim=_TINY_SDXL_L.hidden_size + _TINY_BIG_G.hidden_size, use_linear_in_transformer=True,
                           transformer_depth_per_level=(0, 1, 2), transformer_depth_middle=2,
                           adm_in_channels=_TINY_G_PROJECTION + SDXL_SIZE_FEATURES),
        _TINY_SDXL_L, replace(TINY_VAE, scaling_factor=SDXL_LATENT_SCALE), text_2=_TINY_BIG_G,
        native_size=TINY_NATIVE_SIZE),
    ("sdxl", "full"): RandomSpec(
        "sdxl", UNetConfig(channel_mult=(1, 2, 4), num_head_channels=64, context_dim=2048, use_linear_in_transformer=True,
                           transformer_depth_per_level=(0, 2, 10), transformer_depth_middle=10, adm_in_channels=2816),
        TextEncoderConfig(), VAEConfig(scaling_factor=SDXL_LATENT_SCALE), text_2=_BIG_G, native_size=1024),
}
# What `write_random(family=...)` takes: the SD 2.x v variant is the same networks declared as v-prediction (768 px).
FAMILY_NAMES = ("sd1", "sd2", "sd2-v", "sdxl")
PRESET_NAMES = ("tiny", "full")
# SAI ModelSpec (modelspec.*) names, as kohya's sd-scripts writes them; engine.loading.resolve_prediction reads them.
_MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v"}
_MODELSPEC_ARCHITECTURE = {
    ("sd2", "eps"): "stable-diffusion-v2-512", ("sd2", "v"): "stable-diffusion-v2-768-v",
    ("sdxl", "eps"): "stable-diffusion-xl-v1-base",
}


def random_spec(family: str = "sd1", preset: str = "tiny") -> RandomSpec:
    """The networks ``write_random`` makes; ``preset`` "sd15" is SD 1.x's "full"."""
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r}: {', '.join(FAMILY_NAMES)}")
    if preset == "sd15" and family == "sd1":
        preset = "full"
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}: {', '.join(PRESET_NAMES)}")
    if family == "sd2-v":
        spec = _SPECS[("sd2", preset)]
        return replace(spec, prediction="v", native_size=768 if preset == "full" else spec.native_size)
    return _SPECS[(family, preset)]


def randomize_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights with some spread (norm gains near 1, fan-in scaled elsewhere), so that no layer is
    left at zero and every tensor of a parity test carries signal."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)


@dataclass
class RandomModels:
    unet: UNetModel
    text_encoder: TextModel
    vae: AutoencoderKL
    text_encoder_2: TextModel | None = None  # SDXL's bigG
    text_projection: torch.Tensor | None = None  # SD 2.x's OpenCLIP projection [width, proj], unused by the model


def random_models(spec: RandomSpec, seed: int = 0, *, inpaint: bool = False, dtype: torch.dtype | None = None) -> RandomModels:
    """The spec's networks with random weights from one generator seeded ``seed``, each cast to ``dtype`` as soon as
    it is filled (so a full preset in float16 never holds every network in float32 at once)."""
    gen = torch.Generator().manual_seed(seed)

    def filled(module: torch.nn.Module) -> torch.nn.Module:
        randomize_(module, gen)
        return module.to(dtype) if dtype is not None else module

    unet_cfg = replace(spec.unet, in_channels=2 * spec.unet.out_channels + 1) if inpaint else spec.unet
    unet = filled(UNetModel(unet_cfg))
    text = filled(build_text_encoder(spec.text))
    text_2 = None if spec.text_2 is None else filled(build_text_encoder(spec.text_2))
    for model in (text, text_2):
        if model is not None:
            reset_position_ids(model, "cpu")  # type: ignore[arg-type]
    projection = None
    if spec.projection_dim is not None:
        width = spec.text.hidden_size
        projection = torch.randn(width, spec.projection_dim, generator=gen) / width**0.5
    vae = filled(AutoencoderKL(spec.vae))
    return RandomModels(unet, text, vae, text_2, projection)  # type: ignore[arg-type]


def models_state_dict(spec: RandomSpec, models: RandomModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``models`` in the single-file layout of ``spec``'s family."""
    if spec.family == "sd1":
        return sd1_state_dict(models.unet, models.text_encoder, models.vae, dtype)  # type: ignore[arg-type]
    if spec.family == "sd2":
        return sd2_state_dict(models.unet, models.text_encoder, models.vae, dtype,  # type: ignore[arg-type]
                              text_projection=models.text_projection)
    return sdxl_state_dict(models.unet, models.text_encoder, models.text_encoder_2, models.vae, dtype)  # type: ignore[arg-type]


def random_metadata(spec: RandomSpec, models: RandomModels) -> dict[str, str]:
    """Head sizes (no tensor shape carries them), native size, and for SD 2.x / SDXL the SAI ModelSpec
    architecture and prediction type, as trainers write them."""
    encoders = [m for m in (models.text_encoder, models.text_encoder_2) if m is not None]
    meta = checkpoint_metadata(models.unet, encoders, always_text_heads=spec.family == "sd1")
    meta[META_NATIVE_SIZE] = str(spec.native_size)
    if spec.family != "sd1":
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.prediction_type"] = _MODELSPEC_PREDICTION[spec.prediction]
        # ModelSpec names no inpainting architecture: those files declare none rather than a made-up one.
        if models.unet.config.in_channels == models.unet.config.out_channels:
            meta["modelspec.architecture"] = _MODELSPEC_ARCHITECTURE[(spec.family, spec.prediction)]
    return meta


def random_state_dict(
    family: str = "sd1", preset: str = "tiny", *, seed: int = 0, inpaint: bool = False, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by full key, metadata) of the file :func:`write_random` writes with these arguments."""
    spec = random_spec(family, preset)
    models = random_models(spec, seed, inpaint=inpaint, dtype=dtype)
    return models_state_dict(spec, models, dtype), random_metadata(spec, models)


def write_random(
    path: str | os.PathLike[str],
    family: str = "sd1",
    preset: str = "tiny",
    *,
    seed: int = 0,
    inpaint: bool = False,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a random checkpoint of ``family`` ("sd1", "sd2", "sd2-v", "sdxl") at ``preset`` ("tiny", "full").
    ``metadata`` is added to (and overrides) what the file declares about itself."""
    if inpaint and family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"no inpainting variant of {family!r}: sd1, sd2 and sdxl only")
    return write_random_spec(path, random_spec(family, preset), seed=seed, inpaint=inpaint, dtype=dtype,
                             metadata=metadata)


def write_random_spec(
    path: str | os.PathLike[str],
    spec: RandomSpec,
    *,
    seed: int = 0,
    inpaint: bool = False,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """:func:`write_random` for any :class:`RandomSpec` (e.g. a preset with some widths replaced), streamed.

    The file's layout comes from the networks built on the meta device (no memory); then, in the order
    :func:`random_models` draws from the generator, each network is allocated in ``dtype`` (no default init: every
    parameter is overwritten), filled, its tensors written, and put back to meta before the next. The same layout
    function as :func:`random_state_dict` names the tensors, so the two cannot disagree."""
    gen = torch.Generator().manual_seed(seed)
    unet_cfg = replace(spec.unet, in_channels=2 * spec.unet.out_channels + 1) if inpaint else spec.unet
    factories: dict[str, Callable[[], torch.nn.Module]] = {"unet": lambda: UNetModel(unet_cfg),
                                                            "text_encoder": lambda: build_text_encoder(spec.text)}
    if spec.text_2 is not None:
        text_2 = spec.text_2
        factories["text_encoder_2"] = lambda: build_text_encoder(text_2)
    factories["vae"] = lambda: AutoencoderKL(spec.vae)

    def on_meta(name: str) -> torch.nn.Module:
        with torch.device("meta"):
            return factories[name]().to(dtype)

    meta = {name: on_meta(name) for name in factories}
    projection_meta = None if spec.projection_dim is None else torch.empty(
        spec.text.hidden_size, spec.projection_dim, device="meta")
    models = RandomModels(meta["unet"], meta["text_encoder"], meta["vae"], meta.get("text_encoder_2"),  # type: ignore[arg-type]
                          projection_meta)
    header = models_state_dict(spec, models, dtype)
    file_meta = {**random_metadata(spec, models), **(metadata or {})}

    def filled(name: str) -> torch.nn.Module:
        module = on_meta(name).to_empty(device="cpu")
        randomize_(module, gen)
        if name.startswith("text_encoder"):
            reset_position_ids(module, "cpu")  # type: ignore[arg-type]
        return module

    # random_models' draw order: U-Net, text encoder(s), SD 2.x's projection, VAE.
    steps: list[tuple[str, Callable[[], object]]] = [(n, lambda n=n: filled(n)) for n in factories if n != "vae"]
    if spec.projection_dim is not None:
        width = spec.text.hidden_size
        steps.append(("text_projection", lambda: torch.randn(width, spec.projection_dim, generator=gen) / width**0.5))
    steps.append(("vae", lambda: filled("vae")))
    with SafetensorsWriter(path, header, file_meta) as writer:
        for attr, make in steps:
            placeholder = getattr(models, attr)
            setattr(models, attr, make())
            # Only this step's tensors are real (plus constants such as logit_scale): write those not yet written.
            for key, tensor in models_state_dict(spec, models, dtype).items():
                if key in writer.pending and not tensor.is_meta:
                    writer.write(key, tensor)
            setattr(models, attr, placeholder)  # frees the network before the next is allocated
    return str(path)


# ---- SD 1.x, as the rest of the code base has always called it -------------------------------------------------


def random_sd1_models(
    seed: int = 0, *, unet: UNetConfig = TINY_UNET, text: TextEncoderConfig = TINY_TEXT, vae: VAEConfig = TINY_VAE, inpaint: bool = False
) -> tuple[UNetModel, torch.nn.Module, AutoencoderKL]:
    gen = torch.Generator().manual_seed(seed)
    if inpaint:
        unet = replace(unet, in_channels=9)
    modules = (UNetModel(unet), build_text_encoder(text), AutoencoderKL(vae))
    for module in modules:
        randomize_(module, gen)
    return modules  # type: ignore[return-value]


def random_sd1_state_dict(
    seed: int = 0,
    *,
    unet: UNetConfig = TINY_UNET,
    text: TextEncoderConfig = TINY_TEXT,
    vae: VAEConfig = TINY_VAE,
    inpaint: bool = False,
    clip_text_model_level: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """LDM-layout state dict; ``clip_text_model_level=False`` writes the older CLIP key layout."""
    u, t, v = random_sd1_models(seed, unet=unet, text=text, vae=vae, inpaint=inpaint)
    return sd1_state_dict(u, t, v, dtype, clip_text_model_level=clip_text_model_level)  # type: ignore[arg-type]


def sd1_metadata(unet: UNetConfig = TINY_UNET, text: TextEncoderConfig = TINY_TEXT) -> dict[str, str]:
    return {META_UNET_HEADS: str(unet.num_heads), META_TEXT_HEADS: str(text.num_heads)}


def write_random_sd1(
    path: str | os.PathLike[str], preset: str = "tiny", *, seed: int = 0, inpaint: bool = False, dtype: torch.dtype = torch.float32, **kw
) -> str:
    try:
        unet, text, vae = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}: {', '.join(PRESETS)}") from None
    u, t, v = random_sd1_models(seed, unet=unet, text=text, vae=vae, inpaint=inpaint)
    return save_sd1_checkpoint(path, u, t, v, dtype=dtype, **kw)  # type: ignore[arg-type]

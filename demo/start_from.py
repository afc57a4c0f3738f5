"""``adforge train demo --start-from FILE``: continuing the recipe from a file an earlier part of it wrote.

A file records the recipe that made it (``adforge.recipe``) and its training report (``adforge.training``). It can
start a recipe whose settings are its own and whose first diffusion stages are the file's stages; its VAE must be
the one the recipe builds (its decoder aside: the decoder tunes change no latent, so any file of the same diffusion
recipe can take, or keep, a tuned decoder).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from demo.recipe import DemoRecipe, DemoStage, recipe_json, recorded_recipe
from engine.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, StateDict, open_state_dict
from engine.checkpoint_writer import sd1_state_dict
from engine.unet import UNetModel
from engine.vae import AutoencoderKL

# Recipe settings of the decoder-only tunes. They are not compared when a file starts a recipe: the decoder changes
# no latent.
DECODER_FIELDS = ("decoder_steps", "decoder_batch", "decoder_lr")
DECODER_FOCUS_FIELDS = ("decoder_focus_steps", "decoder_focus_share", "decoder_focus_shapes")


def decoder_settings(recipe_json: dict) -> dict:
    """A recipe's decoder settings; a file made before they existed (no such field) had an untuned decoder, and one
    made before the focused tune existed had none."""
    if not recipe_json.get("decoder_steps"):
        return {"decoder_steps": 0}
    settings = {k: recipe_json.get(k) for k in DECODER_FIELDS}
    if recipe_json.get("decoder_focus_steps"):
        settings.update({k: recipe_json.get(k) for k in DECODER_FOCUS_FIELDS})
    return settings


@dataclass(frozen=True)
class EarlierFile:
    path: Path
    tensors: StateDict  # opened, not read (safetensors maps the file)
    stages: int  # diffusion stages the file holds
    training: dict  # its training report
    decoder: dict  # its decoder settings (decoder_settings)


def check_earlier_stages(path: Path, recipe: DemoRecipe) -> EarlierFile:
    """Check that ``path`` was made by the first stages of ``recipe``; refuse a file made by any other recipe."""
    sd = open_state_dict(path)
    try:
        theirs = recorded_recipe(json.loads(sd.metadata["adforge.recipe"]))
        training = json.loads(sd.metadata["adforge.training"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a demo checkpoint written by adforge train demo (metadata {exc} missing or unreadable)") from None
    ours = json.loads(json.dumps(recipe_json(recipe)))
    # A setting added to the stages after the file was made is absent from its metadata; every such setting's
    # default reproduces the older behaviour exactly, so it counts at its default.
    stage_defaults = json.loads(json.dumps(asdict(DemoStage())))
    if isinstance(theirs.get("diffusion"), dict):
        theirs["diffusion"] = {**stage_defaults, **theirs["diffusion"]}
    theirs["continuations"] = [{**stage_defaults, **c} for c in theirs.get("continuations", [])]
    their_stages, our_stages = theirs.pop("continuations"), ours.pop("continuations")
    their_decoder = decoder_settings(theirs)
    for k in DECODER_FIELDS + DECODER_FOCUS_FIELDS:
        theirs.pop(k, None), ours.pop(k, None)
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"{path}: made by another recipe (it differs in {', '.join(differ)}); it cannot start this one")
    for n, stage in enumerate(their_stages):
        if n >= len(our_stages) or stage != our_stages[n]:
            raise ValueError(f"{path}: its diffusion stage {n + 2} was trained with other settings than this recipe's "
                             f"(file: {stage}; recipe: {our_stages[n] if n < len(our_stages) else 'no such stage'})")
    return EarlierFile(path, sd, len(their_stages) + 1, training, their_decoder)


def check_earlier_vae(earlier: EarlierFile, vae: AutoencoderKL) -> None:
    """The file's VAE must be the one this recipe builds, its decoder aside (tuned here or taken from the file)."""
    for name, value in vae.state_dict().items():
        key = VAE_PREFIX + name
        if name.startswith("decoder."):
            continue
        if key not in earlier.tensors:
            raise ValueError(f"{earlier.path}: tensor {key} missing")
        if not torch.equal(earlier.tensors[key], value.to(torch.float16)):
            raise ValueError(f"{earlier.path}: its VAE differs from the one this recipe builds (tensor {key})")


def load_decoder(earlier: EarlierFile, vae: AutoencoderKL) -> None:
    prefix = VAE_PREFIX + "decoder."
    own = vae.decoder.state_dict()
    missing = [k for k in own if prefix + k not in earlier.tensors]
    if missing:
        raise ValueError(f"{earlier.path}: tensor {prefix + missing[0]} missing")
    vae.decoder.load_state_dict({k: earlier.tensors[prefix + k].to(v.dtype) for k, v in own.items()})


def load_earlier_stages(
    earlier: EarlierFile, unet: UNetModel, text_encoder: torch.nn.Module, vae: AutoencoderKL
) -> tuple[int, dict]:
    """Load the U-Net and text encoder of a checked earlier file (train_demo has checked its VAE with
    :func:`check_earlier_vae` before any training)."""
    sd, path = earlier.tensors, earlier.path
    expected = sd1_state_dict(unet, text_encoder, vae, torch.float16)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors missing, first {missing[0]}")
    for prefix, module in ((UNET_PREFIX, unet), (CLIP_PREFIX + "text_model.", text_encoder)):
        own = module.state_dict()
        module.load_state_dict({k: sd[prefix + k].to(own[k].dtype) for k in own if prefix + k in expected}, strict=False)
    return earlier.stages, earlier.training

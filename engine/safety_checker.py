"""The Stable Diffusion safety checker: a CLIP vision tower whose projected image embedding is compared with fixed
concept embeddings.

Weights are the user's (diffusers' ``safety_checker`` folder: ``config.json`` + ``model.safetensors``); nothing of the
model ships with adforge. The file's names are the ones diffusers writes: ``vision_model.*`` (transformers'
``CLIPVisionModel``), ``visual_projection.weight`` (no bias), ``concept_embeds`` [17, proj], ``special_care_embeds``
[3, proj] and their thresholds ``concept_embeds_weights`` [17] and ``special_care_embeds_weights`` [3].

The decision, per image: ``cos`` is the cosine similarity of the normalised projected image embedding to each
concept. A special-care score is ``cos - weight``; when any is above 0 the concept scores get 0.01 added (a stricter
bar for images already close to a special-care concept). A concept score is ``cos - weight + adjustment``; the image
is flagged when any concept score is above 0.

Only safetensors are read: a pickled ``.bin`` could run code when loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

__all__ = ["SafetyChecker", "SafetyCheckerError", "SafetyVerdict", "checker_files", "load_safety_checker",
           "preprocess"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPECIAL_CARE_ADJUSTMENT = 0.01
# Buffers that some transformers versions save and others recompute; a file may or may not carry them.
_OPTIONAL = ("vision_model.vision_model.embeddings.position_ids",)


class SafetyCheckerError(ValueError):
    pass


@dataclass(frozen=True)
class SafetyVerdict:
    flagged: bool
    concept_scores: tuple[float, ...]  # cos - weight + adjustment, per concept
    special_scores: tuple[float, ...]  # cos - weight, per special-care concept

    @property
    def concepts(self) -> list[int]:
        """Indices of the concepts that scored above 0."""
        return [i for i, s in enumerate(self.concept_scores) if s > 0]

    @property
    def max_score(self) -> float:
        return max(self.concept_scores)


class SafetyChecker(nn.Module):
    def __init__(self, vision: CLIPVisionConfig, projection_dim: int, concepts: int = 17, special: int = 3) -> None:
        super().__init__()
        self.image_size = int(vision.image_size)
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.register_buffer("concept_embeds", torch.ones(concepts, projection_dim))
        self.register_buffer("special_care_embeds", torch.ones(special, projection_dim))
        self.register_buffer("concept_embeds_weights", torch.ones(concepts))
        self.register_buffer("special_care_embeds_weights", torch.ones(special))

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [batch, proj] of CLIP-normalised pixels [batch, 3, size, size]."""
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return self.visual_projection(pooled)

    @torch.no_grad()
    def scores(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(concept scores [batch, concepts], special-care scores [batch, special]), float32 on the CPU."""
        image = nn.functional.normalize(self.embed(pixels).float(), dim=-1)
        special_cos = image @ nn.functional.normalize(self.special_care_embeds.float(), dim=-1).T
        concept_cos = image @ nn.functional.normalize(self.concept_embeds.float(), dim=-1).T
        special = special_cos - self.special_care_embeds_weights.float()
        adjustment = (special > 0).any(dim=1, keepdim=True).float() * SPECIAL_CARE_ADJUSTMENT
        concept = concept_cos - self.concept_embeds_weights.float() + adjustment
        return concept.cpu(), special.cpu()

    def check(self, images: list[Image.Image], batch_size: int = 8) -> list[SafetyVerdict]:
        device = self.visual_projection.weight.device
        dtype = self.visual_projection.weight.dtype
        out: list[SafetyVerdict] = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess(images[start:start + batch_size], self.image_size).to(device=device, dtype=dtype)
            concept, special = self.scores(pixels)
            for c, s in zip(concept.tolist(), special.tolist()):
                out.append(SafetyVerdict(flagged=any(x > 0 for x in c), concept_scores=tuple(c), special_scores=tuple(s)))
        return out


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """CLIP's image preprocessing: RGB, the shortest side resized to ``size`` (bicubic), centre crop ``size`` x
    ``size``, scaled to [0, 1] and normalised with CLIP's mean and std. [batch, 3, size, size] float32."""
    batch = []
    for image in images:
        im = image.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        im = im.crop((left, top, left + size, top + size))
        batch.append(np.asarray(im, dtype=np.float32) / 255.0)
    arr = (np.stack(batch) - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def checker_files(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(config.json, model.safetensors) for a ``safety_checker`` folder or its weights file."""
    p = Path(path)
    if p.is_dir():
        config, weights = p / CONFIG_FILE, p / WEIGHTS_FILE
        if not weights.is_file():
            pickles = [n for n in ("pytorch_model.bin", "model.bin") if (p / n).is_file()]
            hint = f" (it has {pickles[0]}: only safetensors are read, convert it)" if pickles else ""
            raise SafetyCheckerError(f"{p}: no {WEIGHTS_FILE} in the safety checker folder{hint}")
    elif p.is_file():
        if p.suffix != ".safetensors":
            raise SafetyCheckerError(f"{p}: the safety checker's weights must be a .safetensors file")
        config, weights = p.parent / CONFIG_FILE, p
    else:
        raise SafetyCheckerError(f"{p}: no such safety checker file or folder")
    if not config.is_file():
        raise SafetyCheckerError(f"{config}: missing (the safety checker's config.json must sit beside {weights.name})")
    return config, weights


def _vision_config(config: Path) -> tuple[CLIPVisionConfig, int]:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SafetyCheckerError(f"{config}: cannot read the safety checker's config: {exc}") from None
    if not isinstance(data, dict):
        raise SafetyCheckerError(f"{config}: not a JSON object")
    vision = data.get("vision_config") or data.get("vision_config_dict")
    if not isinstance(vision, dict):
        raise SafetyCheckerError(f"{config}: missing key 'vision_config' (a CLIP config as diffusers saves it)")
    projection = data.get("projection_dim")
    if not isinstance(projection, int) or projection < 1:
        raise SafetyCheckerError(f"{config}: missing key 'projection_dim' (a positive whole number)")
    known = CLIPVisionConfig().to_dict()
    return CLIPVisionConfig(**{k: v for k, v in vision.items() if k in known}), projection


def load_safety_checker(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SafetyChecker:
    config, weights = checker_files(path)
    vision, projection = _vision_config(config)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            names = set(f.keys())
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in ("concept_embeds", "special_care_embeds") if n in names}
            if len(shapes) < 2:
                missing = "concept_embeds" if "concept_embeds" not in shapes else "special_care_embeds"
                raise SafetyCheckerError(f"{weights}: missing key '{missing}' (not a safety checker's weights)")
            with torch.device("meta"):
                model = SafetyChecker(vision, projection, shapes["concept_embeds"][0], shapes["special_care_embeds"][0])
            wanted = model.state_dict()
            state = {}
            for name, ref in wanted.items():
                if name not in names:
                    if name in _OPTIONAL:
                        continue
                    raise SafetyCheckerError(f"{weights}: missing key '{name}' (config.json and the weights do not match, "
                                             "or this is not a safety checker's file)")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(ref.shape):
                    raise SafetyCheckerError(f"{weights}: key '{name}' has shape {tuple(tensor.shape)}, config.json "
                                             f"implies {tuple(ref.shape)}")
                state[name] = tensor
    except SafetensorError as exc:
        raise SafetyCheckerError(f"{weights}: not a readable safetensors file: {exc}") from None
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # position ids the file did not carry are rebuilt
        if buf.is_meta and name.endswith("position_ids"):
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                                                       persistent=False)
    return model.to(device=device, dtype=dtype).eval()

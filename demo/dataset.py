"""The demo model's data as the generic trainers take it: image batches, caption batch samplers, focus sets.

Every sampler draws all its randomness from the generator the trainer hands it (so a resumed run draws exactly
what an uninterrupted one would), and a setting at its default draws exactly what it drew before the setting existed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from demo.recipe import DemoStage
from demo.scenes import SHAPES, Scene, attribute_targets, caption, partial_caption, random_scene, render

BatchFn = Callable[[int, torch.Generator], tuple]


def image_tensor(scenes: Sequence[Scene], size: int) -> torch.Tensor:
    """(n, 3, size, size) renders of ``scenes`` in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(render(s, size), dtype=np.float32).transpose(2, 0, 1) / 255.0 for s in scenes]))


def vae_batches(seed: int, batch: int, size: int, crop: int) -> Iterator[torch.Tensor]:
    """Random ``crop``-pixel windows of full renders: the VAE is convolutional, so it learns edges and colours
    from crops at a quarter of the cost (its one attention block sees fewer positions, which it tolerates)."""
    rng = random.Random(seed)
    while True:
        # held_out=None: the VAE only learns to draw pixels; it never sees captions, so nothing leaks.
        images = image_tensor([random_scene(rng, held_out=None) for _ in range(batch)], size)
        if crop < size:
            y, x = rng.randrange(0, size - crop + 1, 8), rng.randrange(0, size - crop + 1, 8)
            images = images[:, :, y : y + crop, x : x + crop]
        yield images


def check_focus(what: str, share: float, shapes) -> None:
    """Refuse a focus share outside (0, 1] or focus shapes that are not scene shapes, naming the setting's owner."""
    if not 0 < share <= 1:
        raise ValueError(f"{what}: focus share {share} must be above 0 and at most 1")
    if not shapes or set(shapes) - set(SHAPES):
        raise ValueError(f"{what}: focus shapes {list(shapes)}: name one or more of {', '.join(SHAPES)}")


def focus_indices(scenes: Sequence[Scene], shapes, what: str) -> torch.Tensor:
    """Indices of the scenes holding a small object of one of ``shapes`` (checked by :func:`check_focus`)."""
    wanted = set(shapes)
    idx = [i for i, s in enumerate(scenes) if any(o.size == "small" and o.shape in wanted for o in s.objects)]
    if not idx:
        raise ValueError(f"{what}: no training scene holds a small {' or '.join(sorted(wanted))}: nothing to focus on")
    return torch.tensor(idx)


def focused(idx: torch.Tensor, focus: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """``idx`` with each entry replaced, with probability ``share``, by a random one of ``focus``."""
    pick = torch.rand(len(idx), generator=gen) < share
    return torch.where(pick, focus[torch.randint(0, len(focus), (len(idx),), generator=gen)], idx)


def diffusion_sampler(scenes: Sequence[Scene], latents: torch.Tensor, stage: DemoStage) -> BatchFn:
    """The batch sampler of :func:`engine.training.diffusion_trainer.train_text_to_image` for one stage: scaled
    latents of randomly drawn training scenes, a caption of each in the stage's edition, and (with
    ``stage.text_aux_weight``) the attribute heads' targets."""
    focus = focus_indices(scenes, stage.focus_shapes, "a diffusion stage") if stage.focus_share else None

    def sample_batch(n: int, gen: torch.Generator) -> tuple:
        idx = torch.randint(0, len(scenes), (n,), generator=gen)
        if focus is not None:  # (only then: a stage without focus draws exactly what earlier recipes drew)
            idx = focused(idx, focus, stage.focus_share, gen)
        # A fresh wording of each caption every time a scene is drawn, seeded from the trainer's generator so a
        # resumed run draws exactly what an uninterrupted one would.
        wording = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
        captions, targets = [], []
        direction = stage.caption_edition >= 2
        for i in idx.tolist():
            # (Short-circuit: a stage without partial captions draws exactly what earlier recipes drew.)
            if stage.partial_captions and wording.random() < stage.partial_captions:
                text, stated = partial_caption(scenes[i], wording, state_direction=direction)
            else:
                text, stated = caption(scenes[i], wording, state_direction=direction), None
            captions.append(text)
            targets.append(attribute_targets(scenes[i], stated, stage.caption_edition))
        if stage.text_aux_weight:
            return latents[idx], captions, torch.tensor(targets)
        return latents[idx], captions

    return sample_batch


def decoder_sampler(scenes: Sequence[Scene], latents: torch.Tensor, scale: float, size: int,
                    focus: tuple[torch.Tensor, float] | None = None) -> BatchFn:
    """The batch sampler of :func:`demo.decoder_tune.train_decoder`: exactly the latents the U-Net learns (and so
    draws), unscaled, and the targets rendered afresh. ``focus``: (focus indices, share) for a focused tune."""

    def sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(scenes), (n,), generator=gen)
        if focus is not None:
            idx = focused(idx, focus[0], focus[1], gen)
        idx = idx.tolist()
        return latents[idx] / scale, image_tensor([scenes[i] for i in idx], size)

    return sample

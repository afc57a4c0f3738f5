"""One training step of the brand trainers (LoRA, embedding, DreamBooth), shared so the three see data alike:
the bucketed images and the order they come in, the noising of x0 to x_t with its eps or v target, the U-Net's
prediction under the CUDA speed-ups, and the optimizer step.

Every random draw comes from the run's one CPU generator in a fixed order (caption dropout, when the trainer has
it, then timesteps, then noise, then the noise offset's), drawn on the CPU and then moved, as the pipeline does: a
resumed run, or the same run on another device, draws the same numbers. The order images are seen in is a pure
function of (seed, epoch), so a resumed run needs no data-loader state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from engine.schedule import DiscreteSchedule
from engine.training.buckets import Bucket, assign_buckets, bucket_step, make_buckets
from engine.training.image_set import ImageSet


def refuse_unsupported_family(models, kind: str, why: str = "") -> None:
    """ValueError for what the brand trainers do not train on: SDXL (its two encoders, pooled output and size
    embedding need their own conditioning path, which only the LoRA trainer has so far; ``why`` may add the
    trainer's own reason) and inpainting models."""
    if models.text_encoder_2 is not None or models.family.name.startswith("sdxl"):
        raise ValueError(f"{kind} training for {models.family.label} is not supported yet (SD 1.x and SD 2.x are)"
                         + (f": {why}" if why else ""))
    if models.family.inpainting:
        raise ValueError(f"{kind} training on an inpainting model is not supported; train on the base model")


def training_resolution(models, resolution: int | None) -> tuple[int, int]:
    """(resolution, alignment): the configured resolution (None: the model's native size), refused unless a
    multiple of the VAE's and U-Net's downsampling together."""
    resolution = resolution or models.native_size
    align = models.vae.config.downscale_factor * models.unet.config.downsample_factor
    if resolution % align:
        raise ValueError(f"resolution {resolution} must be a multiple of {align} for this model")
    return resolution, align


def bucket_images(image_set: ImageSet, resolution: int, align: int, max_ratio: float) -> dict[Bucket, list[int]]:
    """Bucket -> indices of the images that go to it."""
    return assign_buckets([(it.width, it.height) for it in image_set.items],
                          make_buckets(resolution, bucket_step(resolution, align), max_ratio))


def epoch_plan(buckets: dict[Bucket, list[int]], batch_size: int, seed: int, epoch: int) -> list[tuple[Bucket, list[int]]]:
    """The batches of one epoch: each bucket's images shuffled and cut into batches, the batches shuffled. A pure
    function of (seed, epoch), so a resumed run needs no data-loader state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches: list[tuple[Bucket, list[int]]] = []
    for bucket, members in buckets.items():
        order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        batches += [(bucket, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def planned_batches(buckets: dict[Bucket, list[int]], batch_size: int, seed: int, first: int,
                    steps: int) -> Iterator[tuple[int, list[int]]]:
    """(step index, image indices) for steps ``first`` to ``steps - 1``, epoch after epoch of :func:`epoch_plan`
    (one epoch's plan held at a time)."""
    plan_len = len(epoch_plan(buckets, batch_size, seed, 0))
    plan_cache: dict[int, list[tuple[Bucket, list[int]]]] = {}
    for i in range(first, steps):
        epoch, pos = divmod(i, plan_len)
        if epoch not in plan_cache:
            plan_cache.clear()
            plan_cache[epoch] = epoch_plan(buckets, batch_size, seed, epoch)
        yield i, plan_cache[epoch][pos][1]


def checkpoint_blocks(unet) -> list:
    """Wrap each U-Net block's forward in activation checkpointing (recompute its activations in backward instead
    of keeping them); returns the blocks, for :func:`uncheckpoint_blocks`."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        block.forward = (lambda *args, _f=block.forward: checkpoint(_f, *args, use_reentrant=False))
    return blocks


def uncheckpoint_blocks(blocks: list) -> None:
    for block in blocks:
        del block.forward  # the instance attribute goes: the class's forward is back


def cuda_speedups(models, mixed_precision: str, gradient_checkpointing: bool) -> tuple[AbstractContextManager, list]:
    """(autocast for the forward, blocks wrapped for checkpointing: give them to :func:`uncheckpoint_blocks` at the
    end). Both apply on CUDA only: bf16 autocast on the CPU is a speed gamble, and checkpointing saves memory a CPU
    run does not lack."""
    cuda = models.device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and mixed_precision == "bf16"
                else nullcontext())
    wrapped = checkpoint_blocks(models.unet) if cuda and gradient_checkpointing else []
    return autocast, wrapped


class DiffusionStep:
    """Noise x0 at uniform timesteps of the SD training schedule (its 1000 steps, shared by SD 1.x, 2.x and SDXL) and
    return the U-Net's prediction with its target: eps, or v = sqrt(ac) eps - sqrt(1-ac) x0 for v-prediction."""

    def __init__(self, models, gen: torch.Generator, *, noise_offset: float = 0.0,
                 autocast: AbstractContextManager | None = None) -> None:
        self.models, self.gen, self.noise_offset = models, gen, noise_offset
        self.autocast = autocast if autocast is not None else nullcontext()
        self.ac = DiscreteSchedule.sd1().alphas_cumprod.float()

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target); t, the noise and the offset drawn in that order from the generator, on the CPU."""
        gen, device = self.gen, self.models.device
        t = torch.randint(0, self.ac.shape[0], (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        a = self.ac[t][:, None, None, None]
        noise, a, t = noise.to(device), a.to(device), t.to(device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if self.models.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return x_t, t, target

    def predict(self, x0: torch.Tensor, encode: Callable[[list[str]], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 prediction, target) for noised ``x0``; ``encode(captions)`` runs after the draws, under
        autocast, and gives the context, or (context, y) for an SDXL U-Net (pooled text + size embedding)."""
        x_t, t, target = self.noised(x0)
        models = self.models
        with self.autocast:
            cond = encode(captions)
            context, y = cond if isinstance(cond, tuple) else (cond, None)
            pred = models.unet(x_t.to(models.dtype), t.float(), context.to(models.dtype),
                               None if y is None else y.to(models.dtype))
        return pred.float(), target


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                   params: list[torch.Tensor], max_grad_norm: float) -> None:
    """Backward, clip the gradients' norm to ``max_grad_norm`` (0: no clipping), step the optimizer and the lr."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()

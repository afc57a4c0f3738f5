"""Textual inversion on a loaded SD 1.x / SD 2.x model (``adforge train embedding``): a few new token vectors learn a
product while every weight of the model stays as it is.

The recipe is A1111's "Train > Embedding" with its defaults, on the LoRA trainer's parts:

* ``vectors`` new vectors start as the token embeddings of ``init_text`` (the image set's class word by default,
  so "bottle" starts as a bottle; "*" when the text is blank), repeated or cut to ``vectors``;
* only those vectors train, AdamW with A1111's weight decay 0 and lr 5e-3; the U-Net, the VAE and the whole text
  encoder (its token-embedding table too) are frozen, so the base model is bit-identical after training;
* images, buckets, cached latents, timesteps, noise, the eps/v loss, the lr schedule, the per-epoch order and the
  resumable state are the LoRA trainer's (:mod:`engine.training.diffusion_step`, :mod:`engine.training.run_state`),
  so both trainers see data alike;
* captions are the image set's with its trigger word replaced by the embedding's name, because a prompt at render
  time says the *file's* name ("acme-bottle on a beach" for ``acme-bottle.pt``).

Conditioning goes through the pipeline's own placement of embeddings (:func:`engine.conditioning.chunk_prompt`:
name matching, one placeholder per vector, chunk overflow, emphasis) and the same write-over of the placeholders'
input embeddings; only the text-encoder run is repeated (:func:`engine.training.caption_encoding.encode_captions`),
because the pipeline's runs under ``no_grad`` and the vectors need gradients. A test holds the two to equality, so what the vectors learn is what a prompt gets.

SDXL is refused for now: its files need clip_l and clip_g parts trained together, with the pooled output and size
embedding the LoRA trainer does not have either.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.adapters.embeddings import Embedding
from engine.adapters.refs import AdapterFile
from engine.conditioning import chunk_prompt
from engine.text_encoder import Encoding, TextModel, text_transformer
from engine.tokenizer import ClipTokenizer
from engine.training.buckets import Bucket
from engine.training.caption_encoding import encode_captions, family_encoding
from engine.training.diffusion_step import (
    DiffusionStep, bucket_images, optimizer_step, planned_batches, refuse_unsupported_family, training_resolution,
)
from engine.training.image_set import ImageSet
from engine.training.lora_trainer import _mean_ar_error, cache_latents, lr_factor
from engine.training.run_state import RunState, claim_state_dir, config_fingerprint

STATE_FILE = "embedding-state.pt"
FINGERPRINT_FILE = "embedding-fingerprint.json"
# A name is written in prompts and is the file's stem: letters, digits, "-" and "_" survive every shell, file system
# and prompt parser; brackets, colons, commas or spaces would be read as prompt syntax or split the name.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class EmbeddingTrainingConfig:
    vectors: int = 4
    steps: int = 1000
    lr: float = 5e-3  # A1111's default embedding learning rate
    batch_size: int = 1
    resolution: int | None = None  # None: the model's native size
    init_text: str | None = None  # None: the image set's class word; blank: "*"
    seed: int = 0
    save_every: int = 100
    sample_every: int = 0  # 0: never call on_sample
    lr_scheduler: str = "constant"  # "constant" or "cosine" (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0  # A1111 trains embeddings without weight decay
    max_grad_norm: float = 0.0  # 0: no clipping (A1111's default)
    max_bucket_ratio: float = 2.0
    clip_skip: int = 1

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("steps, batch_size and save_every must be at least 1")
        if not 1 <= self.vectors <= 75:
            raise ValueError(f"vectors must be 1 to 75 (an embedding fits one 75-token prompt chunk), not {self.vectors}")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler must be 'constant' or 'cosine', not {self.lr_scheduler!r}")


@dataclass
class EmbeddingTrainingResult:
    vectors: torch.Tensor  # (n, width) float32 on the CPU
    token: str  # the name prompts use (the file's stem when exported)
    init_text: str
    losses: list[float]  # per step, every run of a resumed training included
    steps: int
    resumed_from: int  # 0 for a fresh run
    resolution: int
    buckets: dict[Bucket, int]
    started_at: float
    finished_at: float
    seconds: float
    fingerprint: str
    extra: dict = field(default_factory=dict)

    def embedding(self, path: str = "") -> Embedding:
        """The trained vectors as the pipeline's prompt encoders take them."""
        return as_embedding(self.token, self.vectors, path)


def as_embedding(token: str, vectors: torch.Tensor, path: str = "") -> Embedding:
    return Embedding(token, vectors, AdapterFile(token, path or f"<training {token}>"))


def check_token(token: str, tokenizer: ClipTokenizer, *, class_word: str | None = None) -> None:
    """Refuse names a prompt could not say unambiguously; ValueError says why and what would do."""
    if not token or not token.strip():
        raise ValueError("the embedding name must not be empty")
    if not _NAME_PATTERN.fullmatch(token):
        raise ValueError(f"embedding name {token!r}: use 1-64 letters, digits, '-' or '_' starting with a letter or "
                         "digit (no spaces or prompt syntax: the name is the file's name and is written in prompts)")
    ids = tokenizer.encode(token)
    if token.upper() == "BREAK":
        raise ValueError("'BREAK' starts a new prompt chunk; it cannot name an embedding")
    # A name that is one whole word of CLIP's vocabulary would take over that word in every prompt ("bottle" would
    # turn every bottle into the product); a made-up or hyphenated name cannot.
    if len(ids) == 1 and tokenizer.decode(ids).strip() == token.lower():
        raise ValueError(f"embedding name {token!r} is an ordinary word for the text encoder: every prompt saying it "
                         f"would get the product; pick a made-up name such as 'acme-{token.lower()}'")
    if class_word is not None and token.lower() == class_word.strip().lower():
        raise ValueError(f"embedding name {token!r} is the class word; pick a name of its own")


def refuse_unsupported(models) -> None:
    refuse_unsupported_family(models, "embedding", "SDXL embeddings need clip_l and clip_g vectors trained together")


def token_captions(image_set: ImageSet, token: str) -> list[str]:
    """Each image's caption with the trigger word (whole word, any case) replaced by the embedding's name."""
    pattern = re.compile(rf"(?<!\w){re.escape(image_set.trigger)}(?!\w)", re.IGNORECASE)
    return [pattern.sub(lambda _m: token, item.caption) for item in image_set.items]


def initial_vectors(text_encoder: TextModel, tokenizer: ClipTokenizer, text: str, n: int) -> torch.Tensor:
    """(n, width) float32: the token embeddings of ``text`` ("*" when blank), cycled or cut to ``n``."""
    ids = tokenizer.encode(text.strip() or "*") or tokenizer.encode("*")
    table = text_transformer(text_encoder).embeddings.token_embedding.weight
    return table.detach()[[ids[i % len(ids)] for i in range(n)]].float().cpu().clone()


def encode_with_embeddings(
    model: TextModel, tokenizer: ClipTokenizer, encoding: Encoding, captions: Sequence[str],
    embeddings: Mapping[str, Embedding], *, clip_skip: int = 1, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B, max_chunks * 77, width) float32, as :meth:`engine.conditioning.PromptEncoder.encode_batch` gives with these
    embeddings, but with gradients flowing to every embedding's ``vectors`` that requires them."""
    return encode_captions(model, tokenizer, encoding, captions, clip_skip=clip_skip, device=device,
                           embeddings=embeddings)


def fingerprint(config: EmbeddingTrainingConfig, image_set: ImageSet, base_sha256: str, resolution: int,
                token: str, init_text: str) -> str:
    return config_fingerprint(config, resolution=resolution, image_set=image_set.sha256, base=base_sha256,
                              token=token, init=init_text)


def train_embedding(
    models,
    image_set: ImageSet,
    config: EmbeddingTrainingConfig,
    *,
    token: str,
    state_dir: str | os.PathLike[str],
    on_step: Callable[[int, int, float], None] | None = None,
    on_sample: Callable[[int, Embedding], None] | None = None,
) -> EmbeddingTrainingResult:
    """Train the embedding ``token`` on ``models`` (an :class:`engine.loading.LoadedModels`) from ``image_set``.

    ``on_step(step, total, loss)`` after every step (from 1); ``on_sample(step, embedding)`` every ``sample_every``
    steps with a detached copy of the current vectors, named ``token``, ready for a prompt's embeddings mapping. An
    exception from a callback stops the run like a kill: the last saved state stays and the next call resumes."""
    config.check()
    refuse_unsupported(models)
    check_token(token, models.tokenizer, class_word=image_set.class_word)
    device = models.device
    resolution, align = training_resolution(models, config.resolution)
    init_text = image_set.class_word if config.init_text is None else (config.init_text.strip() or "*")
    captions = token_captions(image_set, token)
    for item, caption in zip(image_set.items, captions):
        if not any(chunk.fixes for chunk in chunk_prompt(caption, models.tokenizer, {token: _probe(token)})):
            raise ValueError(f"{item.path.name}: caption {caption[:80]!r} does not say the embedding's name {token!r} "
                             "where the text encoder can find it (write the trigger as a word of its own)")
    identity = fingerprint(config, image_set, models.checkpoint.sha256, resolution, token, init_text)
    claim_state_dir(Path(state_dir), FINGERPRINT_FILE, identity,
                    {"token": token, "config": asdict(config), "image_set": image_set.sha256},
                    "embedding training (other settings, name, images or base model)")

    assignment = bucket_images(image_set, resolution, align, config.max_bucket_ratio)
    latents = cache_latents(models, image_set, assignment)
    for net in (models.unet, models.text_encoder, models.vae):
        net.requires_grad_(False)
    vectors = torch.nn.Parameter(initial_vectors(models.text_encoder, models.tokenizer, init_text, config.vectors)
                                 .to(device))
    embedding = as_embedding(token, vectors)
    opt = torch.optim.AdamW([vectors], lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(config.seed)
    run = RunState(Path(state_dir) / STATE_FILE, identity, opt, sched, gen,
                   lambda: {"vectors": vectors.detach().cpu().clone()})
    state = run.resume()
    if state is not None:
        with torch.no_grad():
            vectors.copy_(state["vectors"])
        del state

    # No caption dropout (the name must always be seen) and no noise offset: the LoRA trainer's draws otherwise.
    diffusion = DiffusionStep(models, gen)
    encoding = family_encoding(models)

    def encode(step_captions: list[str]) -> torch.Tensor:
        return encode_with_embeddings(models.text_encoder, models.tokenizer, encoding, step_captions,
                                      {token: embedding}, clip_skip=config.clip_skip, device=device)

    def sample(done: int) -> None:
        on_sample(done, as_embedding(token, vectors.detach().float().cpu().clone()))  # type: ignore[misc]

    run.start_clock()
    for i, members in planned_batches(assignment, config.batch_size, config.seed, run.first, config.steps):
        x0 = torch.stack([latents[m] for m in members])
        pred, target = diffusion.predict(x0, encode, [captions[m] for m in members])
        loss = F.mse_loss(pred, target)
        optimizer_step(loss, opt, sched, [vectors], config.max_grad_norm)
        run.end_step(i + 1, config.steps, loss.item(), save_every=config.save_every,
                     sample_every=config.sample_every, on_step=on_step,
                     on_sample=sample if on_sample is not None else None)
    return EmbeddingTrainingResult(
        vectors=vectors.detach().float().cpu().clone(), token=token, init_text=init_text, losses=run.losses,
        steps=config.steps, resumed_from=run.first, resolution=resolution,
        buckets={b: len(m) for b, m in assignment.items()}, started_at=run.started_at, finished_at=time.time(),
        seconds=run.seconds(), fingerprint=identity,
        extra={"mean_ar_error": _mean_ar_error(image_set, assignment)},
    )

def _probe(token: str) -> Embedding:
    """A one-vector stand-in, enough for chunk_prompt to say where the name is found."""
    return as_embedding(token, torch.zeros(1, 1))

"""The trainer kinds of :mod:`flows.training`: one :class:`Trainer` row each (``lora``, ``embedding``, ``dreambooth``).

A row says only what differs between kinds — the engine trainer and exporter it calls, how a training's identity is
computed before any weights are loaded, and the cheap input checks the kind adds. The order of work, the licence,
samples, resuming and registration are :func:`flows.training.run_training`'s, the same for every row. The engine
modules are imported inside the row builders: importing this module (the CLI's --help, Prefect's deployment scan)
must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.training.image_set import ImageSet

if TYPE_CHECKING:
    from flows.training import TrainingJob

__all__ = ["TRAINERS", "Trainer", "embedding_token", "pivotal_embedding_path", "pivotal_token"]

EMBEDDING_SUFFIXES = (".pt", ".safetensors")


@dataclass(frozen=True)
class Trainer:
    """What differs between trainer kinds; everything else (checks, licence, samples, registration) is shared."""

    name: str  # what the command and the training record call it
    kind: str  # the models table's ``kind`` of the output
    config_class: type
    # (models, image_set, config, job, on_step, on_sample) -> result with .steps/.resumed_from/.seconds/...
    train: Callable[..., Any]
    # (path, result, models, image_set, config, job, licence id, identity) -> Path
    export: Callable[..., Path]
    # (config, image set, base sha256, resolution, job) -> the identity an exported file of this training carries
    fingerprint: Callable[..., str]
    # (job, config) -> None; raises ValueError: input problems of this kind, found before the model is described
    check: Callable[..., None] = lambda job, config: None
    load_dtype: str = "auto"  # what "auto" loads the base as (a full fine-tune needs float32 weights)


def _lora_trainer() -> Trainer:
    from engine.tokenizer import load_clip_tokenizer
    from engine.training.embedding_trainer import check_token
    from engine.training.lora_export import export_lora, export_pivotal_embedding
    from engine.training.lora_trainer import LoraTrainingConfig, fingerprint, train_lora

    def token(job: TrainingJob, config) -> str | None:
        return pivotal_token(job) if config.pivotal_vectors else None

    def check(job: TrainingJob, config) -> None:
        if not config.pivotal_vectors:
            return
        name = pivotal_token(job)
        check_token(name, load_clip_tokenizer(), class_word=job.class_word)
        companion = pivotal_embedding_path(job)
        if companion.exists() and not Path(job.out).exists():
            raise ValueError(f"{companion} exists and is not this training's embedding; remove it or choose --token")

    def train(models, image_set, config, job, on_step, on_sample):
        return train_lora(models, image_set, config, state_dir=job.state_path, on_step=on_step, on_sample=on_sample,
                          token=token(job, config))

    def export(path, result, models, image_set, config, job, licence, identity) -> Path:
        if result.token is not None:
            # The embedding first: the LoRA file is what marks the training as done, so a kill between the two
            # leaves a re-run that writes both again.
            companion = pivotal_embedding_path(job)
            companion.parent.mkdir(parents=True, exist_ok=True)
            export_pivotal_embedding(companion, result, models, image_set, config, lora_name=Path(path).name,
                                     licence=licence)
        return export_lora(path, result, models, image_set, config, licence=licence, output_name=Path(path).stem)

    def identity(config, image_set: ImageSet, base_sha256: str, resolution: int, job) -> str:
        return fingerprint(config, image_set, base_sha256, resolution, token(job, config))

    return Trainer("lora", "lora", LoraTrainingConfig, train, export, identity, check)


def pivotal_token(job: TrainingJob) -> str:
    """A pivotal-tuned LoRA's embedding name: ``--token``, else the trigger's words joined by "-" ("acme bottle" ->
    "acme-bottle"), with "-<class word>" added when the trigger is one word (a lone word would be a CLIP word that
    every prompt saying it would turn into the product)."""
    if job.token:
        return job.token
    words = job.trigger.split()
    return "-".join(words) if len(words) > 1 else f"{words[0]}-{'-'.join(job.class_word.split())}"


def pivotal_embedding_path(job: TrainingJob) -> Path:
    """Where a pivotal-tuned LoRA's embedding goes: ``models/embeddings/<token>.safetensors`` when OUT is in a
    ``loras`` folder (the layout campaigns load adapters from), else beside OUT."""
    out = Path(job.out)
    folder = out.parent.parent / "embeddings" if out.parent.name == "loras" else out.parent
    return folder / f"{pivotal_token(job)}.safetensors"


def embedding_token(job: TrainingJob) -> str:
    """The embedding's name: ``--token``, else OUT's stem (prompts call an embedding by its file's name)."""
    return job.token or Path(job.out).stem


def _embedding_trainer() -> Trainer:
    from engine.tokenizer import load_clip_tokenizer
    from engine.training.embedding_export import export_embedding
    from engine.training.embedding_trainer import EmbeddingTrainingConfig, check_token, fingerprint, train_embedding

    def init_text(config, image_set: ImageSet) -> str:
        # As train_embedding decides it: the identity computed here must equal the one it writes into the file.
        return image_set.class_word if config.init_text is None else (config.init_text.strip() or "*")

    def check(job: TrainingJob, config) -> None:
        token, out = embedding_token(job), Path(job.out)
        if out.suffix.lower() not in EMBEDDING_SUFFIXES:
            raise ValueError(f"{out.name}: an embedding is written as .pt (A1111) or .safetensors, not {out.suffix!r}")
        if out.stem != token:
            raise ValueError(f"--out {out.name}: prompts call an embedding by its file's name, so the file for token "
                             f"{token!r} must be named {token}{out.suffix}")
        # Every SD 1.x / 2.x model shares CLIP's tokenizer, so the name is judged without loading the model.
        check_token(token, load_clip_tokenizer(), class_word=job.class_word)

    def train(models, image_set, config, job, on_step, on_sample):
        return train_embedding(models, image_set, config, token=embedding_token(job), state_dir=job.state_path,
                               on_step=on_step, on_sample=on_sample)

    def export(path, result, models, image_set, config, job, licence, identity) -> Path:
        return export_embedding(path, result, models, image_set, config, licence=licence)

    def identity(config, image_set: ImageSet, base_sha256: str, resolution: int, job) -> str:
        return fingerprint(config, image_set, base_sha256, resolution, embedding_token(job), init_text(config, image_set))

    return Trainer("embedding", "embedding", EmbeddingTrainingConfig, train, export, identity, check)


def _dreambooth_trainer() -> Trainer:
    from engine.training.dreambooth_trainer import DreamBoothConfig, export_dreambooth, fingerprint, train_dreambooth

    def check(job: TrainingJob, config) -> None:
        if Path(job.out).suffix.lower() != ".safetensors":
            raise ValueError(f"{Path(job.out).name}: a DreamBooth checkpoint is written as .safetensors")
        if job.dtype not in ("auto", "float32"):
            # AdamW steps of ~5e-6 vanish in half-precision weights; --mixed-precision bf16 gives the speed instead.
            raise ValueError(f"--dtype {job.dtype}: DreamBooth fine-tunes float32 weights; use --mixed-precision bf16 "
                             "on CUDA for speed")

    def train(models, image_set, config, job, on_step, on_sample):
        return train_dreambooth(models, image_set, config, class_dir=job.state_path / "class-images",
                                state_dir=job.state_path, on_step=on_step, on_sample=on_sample)

    def export(path, result, models, image_set, config, job, licence, identity) -> Path:
        # The trainer's own fingerprint covers the rendered class images, known only after loading the model; the
        # file carries this one so that a re-run recognises its output before loading anything. The licence we
        # decided (the base's registered one, or a stricter override) replaces what the base file declared.
        meta = {"adforge.training_fingerprint": identity}
        if licence:
            meta["adforge.licence"] = meta["modelspec.license"] = licence
        return export_dreambooth(path, result, models, metadata=meta)

    def identity(config, image_set: ImageSet, base_sha256: str, resolution: int, job) -> str:
        # The class images are a function of (base, class prompt, count, seed, steps, cfg), all in config and base.
        return fingerprint(config, image_set, None, base_sha256, resolution)

    return Trainer("dreambooth", "checkpoint", DreamBoothConfig, train, export, identity, check, load_dtype="float32")


TRAINERS: dict[str, Callable[[], Trainer]] = {
    "lora": _lora_trainer, "embedding": _embedding_trainer, "dreambooth": _dreambooth_trainer,
}

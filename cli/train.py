"""``adforge train``: brand training from a folder of product photos (``lora``: a LoRA; ``embedding``: a
textual-inversion embedding; ``dreambooth``: a fine-tuned checkpoint) and training the bundled demo model (``demo``)
and its layout ControlNet (``controlnet``).

The brand commands call :func:`flows.training.run_training` directly, the same function the ``brand-training``
Prefect deployment runs on a GPU worker, so both paths check, train, resume, export and register alike. Each command
only turns its options into one ``TrainingJob``; :func:`_train` does the rest.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli.errors import console, fail, rejected
from cli.options import ConfigOpt, DbOpt

__all__ = ["app", "train_controlnet_command", "train_demo_command", "train_dreambooth_command", "train_embedding_command",
           "train_lora_command"]

app = typer.Typer(no_args_is_help=True, help="Training: brand LoRAs, embeddings and DreamBooth checkpoints from "
                                             "product photos; the bundled demo model.")


@app.command("demo")
def train_demo_command(
    out: Annotated[Path, typer.Option(help="Where to write the checkpoint.")] = Path("models/adforge-demo.safetensors"),
    work_dir: Annotated[
        Path | None, typer.Option(help="Keeps each stage's result; a killed run started again continues. Default: OUT's folder/.demo-train")
    ] = None,
    scale: Annotated[float, typer.Option(min=0.0001, max=1.0, help="Fraction of the full recipe's steps and data (smoke runs).")] = 1.0,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's choice).")] = None,
    start_from: Annotated[
        Path | None,
        typer.Option(help="A checkpoint this command wrote for the first stages of the same recipe (e.g. the shipped "
                          "file): only the stages it lacks are trained."),
    ] = None,
) -> None:
    """Train the bundled demo model (VAE, text encoder, U-Net) from scratch on procedural scenes."""
    from demo.recipe import DemoRecipe
    from demo.train import train_demo

    recipe = DemoRecipe() if scale == 1.0 else DemoRecipe().scaled(scale)
    work = work_dir or out.parent / (".demo-train" if scale == 1.0 else f".demo-train-{scale:g}")
    try:
        report = train_demo(recipe, out, work_dir=work, log=lambda m: console.print(m, soft_wrap=True, markup=False), threads=threads,
                            start_from=start_from)
    except ValueError as exc:
        raise fail(exc, 2) from None
    typer.echo(f"{out} ({report['total_seconds']:.0f} s)")


@app.command("controlnet")
def train_controlnet_command(
    out: Annotated[Path, typer.Option(help="Where to write the ControlNet.")] = Path(
        "models/controlnet/adforge-demo-scribble.safetensors"),
    state_dir: Annotated[
        Path | None, typer.Option(help="Resumable training state; a killed run started again continues. Default: "
                                       "models/.demo-train/controlnet-state")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the recipe's steps (smoke runs).")] = None,
    scenes: Annotated[int | None, typer.Option(min=1, help="Override the recipe's scene count (smoke runs).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
) -> None:
    """Train the bundled model's layout ControlNet (scribble: outline sketch -> scene) from demo/controlnet_recipe.yaml."""
    from demo.controlnet_train import DEFAULT_STATE, train_demo_controlnet

    try:
        report = train_demo_controlnet(out, state_dir=state_dir or DEFAULT_STATE, steps=steps, scenes=scenes,
                                       threads=threads, log=lambda m: console.print(m, soft_wrap=True, markup=False))
    except ValueError as exc:
        raise fail(exc, 2) from None
    typer.echo(f"{out} ({report['wall_seconds']:.0f} s)")


def _train(job, what: str) -> None:
    """Run a training job with a progress bar (loss, steps/s, ETA); bad input exits with 2 before any training."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from engine.checkpoint import CheckpointError
    from engine.training.image_set import ImageSetError
    from flows.licence_policy import LicenseError
    from flows.training import run_training
    from storage.database import DatabaseError

    def log(message: str) -> None:
        console.print(escape(message), soft_wrap=True)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    bar: dict[str, float] = {}

    def on_loaded(first: int, total: int) -> None:
        bar["task"] = progress.add_task(what, total=total, completed=first, loss="-", rate="-")
        bar["first"], bar["t0"] = first, time.perf_counter()
        progress.start()

    def on_step(done: int, total: int, loss: float) -> None:
        elapsed = time.perf_counter() - bar["t0"]
        rate = (done - bar["first"]) / elapsed if elapsed > 0 else 0.0
        progress.update(bar["task"], completed=done, loss=f"{loss:.4f}", rate=f"{rate:.2f}")

    try:
        outcome = run_training(job, on_step=on_step, log=log, on_loaded=on_loaded)
    except ImageSetError as exc:
        raise rejected(f"training images in {exc.folder}", exc.problems, "nothing was trained") from None
    except (LicenseError, CheckpointError, DatabaseError, ValueError) as exc:
        raise fail(exc, 2) from None
    finally:
        if "task" in bar:  # never started (refused input, nothing to train): stop() would print an empty line
            progress.stop()
    typer.echo(f"{outcome.out}")
    typer.echo(f"sha256:  {outcome.sha256}")
    typer.echo(f"time:    {outcome.seconds:.1f} s training over {outcome.steps} steps"
               + (" (already trained: nothing done)" if outcome.skipped else f", {outcome.wall_seconds:.1f} s this run"))
    typer.echo(f"licence: {outcome.licence or 'unknown'}, commercial use "
               + {True: "allowed", False: "not allowed", None: "unknown"}[outcome.commercial_use])
    pivotal = outcome.record.get("pivotal")
    if pivotal:
        typer.echo(f"embedding: {pivotal['embedding']} (prompts say {pivotal['token']!r}; load it with the LoRA)")
    if outcome.samples:
        typer.echo(f"samples: {len(outcome.samples)} in {Path(outcome.samples[0]).parent}")
    typer.echo(outcome.registered or "not registered (--no-register)")


@app.command("lora")
def train_lora_command(
    images: Annotated[Path, typer.Option(help="Folder of product photos (.png .jpg .jpeg .webp); NAME.txt beside an image is its caption.")],
    trigger: Annotated[str, typer.Option(help="The word(s) that will call up the product in prompts, e.g. \"acme bottle\".")],
    class_word: Annotated[str, typer.Option(help="What kind of thing it is, e.g. bottle (keeps the model's prior).")],
    out: Annotated[Path, typer.Option(help="The LoRA file to write (.safetensors), e.g. models/loras/acme-bottle.safetensors.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base checkpoint (default: ADFORGE_MODEL / adforge.toml, else the bundled model).")] = None,
    rank: Annotated[int, typer.Option(min=1, max=1024, help="LoRA rank (network dim).")] = 16,
    alpha: Annotated[float | None, typer.Option(min=0.0, help="LoRA alpha (default: rank / 2).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 1000,
    lr: Annotated[float, typer.Option(min=0.0, help="U-Net learning rate.")] = 1e-4,
    text_lr: Annotated[float, typer.Option(min=0.0, help="Text-encoder learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 1,
    resolution: Annotated[int | None, typer.Option(min=8, help="Training resolution in px (default: the model's native size).")] = None,
    text_encoder: Annotated[bool | None, typer.Option(
        "--text-encoder/--no-text-encoder",
        help="Also train the text encoders' LoRA (default: on for SD 1.x / 2.x, off for SDXL as sd-scripts users do).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of all training randomness.")] = 0,
    save_every: Annotated[int, typer.Option(min=1, help="Save the resumable state every N steps.")] = 100,
    sample_every: Annotated[int, typer.Option(min=0, help="Render sample images every N steps (0: never).")] = 0,
    sample_prompt: Annotated[list[str] | None, typer.Option(
        help="A sample prompt (repeatable; default: \"<trigger> <class word>\" and \"<class word>\").")] = None,
    sample_steps: Annotated[int, typer.Option(min=1, max=150, help="Sampling steps of the sample renders.")] = 20,
    state_dir: Annotated[Path | None, typer.Option(help="Resumable state and samples (default: OUT's folder/.train-<stem>).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float16 on CUDA, float32 on the CPU), float32, float16, bfloat16.")] = "auto",
    mixed_precision: Annotated[str, typer.Option(help="no or bf16 (bfloat16 autocast; CUDA only, ignored on the CPU).")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute U-Net activations in backward (less GPU memory; CUDA only).")] = False,
    license_id: Annotated[str | None, typer.Option("--license", help="Licence of the LoRA (default: the base model's); may not "
                                                                   "allow commercial use that the base does not.")] = None,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register the LoRA in the models table.")] = True,
    conv: Annotated[bool, typer.Option("--conv/--no-conv", help="LoCon: also train the 3x3 convolutions (textures, patterns).")] = False,
    pivotal: Annotated[int, typer.Option(min=0, max=75, help=(
        "Pivotal tuning: train the trigger as an embedding of N new vectors with the LoRA (0: off). Writes "
        "models/embeddings/TOKEN.safetensors beside a models/loras/ OUT (else beside OUT); prompts then say TOKEN "
        "and load both."))] = 0,
    pivotal_lr: Annotated[float, typer.Option(min=0.0, help="Learning rate of the pivotal vectors.")] = 5e-3,
    token: Annotated[str | None, typer.Option(help="With --pivotal: the embedding's name prompts say (default: the trigger "
                                                    "joined by '-', plus '-CLASS' for a one-word trigger).")] = None,
    reg_images: Annotated[Path | None, typer.Option(help=(
        "Folder of regularisation images: the class without the product (NAME.txt captions must not say the trigger; "
        "default caption: the class word), mixed into training so the class word keeps its meaning."))] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train a LoRA of a product from a folder of photos; killed and run again with the same options, it resumes."""
    settings = {"rank": rank, "alpha": alpha, "steps": steps, "lr": lr, "text_lr": text_lr, "batch_size": batch_size,
                "resolution": resolution, "train_text_encoder": text_encoder, "seed": seed, "save_every": save_every,
                "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing, "conv": conv,
                "pivotal_vectors": pivotal, "pivotal_lr": pivotal_lr}
    job = _job("lora", images, trigger, class_word, out, model, settings, state_dir, sample_every, sample_prompt,
               sample_steps, device, dtype, license_id, register, db, config, token=token)
    if reg_images is not None:
        job = replace(job, reg_images=str(reg_images))
    _train(job, f"LoRA {out.stem}")


# The options every brand command shares, spelled once (Typer reads each command's own signature).
ImagesOpt = Annotated[Path, typer.Option(help="Folder of product photos (.png .jpg .jpeg .webp); NAME.txt beside an image is its caption.")]
TriggerOpt = Annotated[str, typer.Option(help="The word(s) that name the product in the captions, e.g. \"acme bottle\".")]
ClassWordOpt = Annotated[str, typer.Option(help="What kind of thing it is, e.g. bottle (keeps the model's prior).")]
BaseModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Base checkpoint (default: ADFORGE_MODEL / adforge.toml, else the bundled model).")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per step.")]
ResolutionOpt = Annotated[int | None, typer.Option(min=8, help="Training resolution in px (default: the model's native size).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of all training randomness.")]
SaveEveryOpt = Annotated[int, typer.Option(min=1, help="Save the resumable state every N steps.")]
SampleEveryOpt = Annotated[int, typer.Option(min=0, help="Render sample images every N steps (0: never).")]
SampleStepsOpt = Annotated[int, typer.Option(min=1, max=150, help="Sampling steps of the sample renders.")]
StateDirOpt = Annotated[Path | None, typer.Option(help="Resumable state and samples (default: OUT's folder/.train-<stem>).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
MixedOpt = Annotated[str, typer.Option(help="no or bf16 (bfloat16 autocast; CUDA only, ignored on the CPU).")]
CheckpointingOpt = Annotated[bool, typer.Option(help="Recompute U-Net activations in backward (less GPU memory; CUDA only).")]
RegisterOpt = Annotated[bool, typer.Option("--register/--no-register", help="Register the output in the models table.")]


def _job(kind: str, images: Path, trigger: str, class_word: str, out: Path, model: str | None, settings: dict,
         state_dir: Path | None, sample_every: int, sample_prompt: list[str] | None, sample_steps: int, device: str,
         dtype: str, license_id: str | None, register: bool, db, config, token: str | None = None):
    from flows.training import TrainingJob

    return TrainingJob(kind=kind, images=str(images), trigger=trigger, class_word=class_word, out=str(out), model=model,
                       settings=settings, state_dir=str(state_dir) if state_dir else None, sample_every=sample_every,
                       sample_prompts=tuple(sample_prompt or ()), sample_steps=sample_steps, device=device, dtype=dtype,
                       license=license_id, register=register, db_url=db, config_file=str(config) if config else None,
                       token=token)


@app.command("embedding")
def train_embedding_command(
    images: ImagesOpt,
    trigger: TriggerOpt,
    class_word: ClassWordOpt,
    out: Annotated[Path, typer.Option(help="The embedding file, named after the token: models/embeddings/TOKEN.pt "
                                           "(A1111) or TOKEN.safetensors (with the audit metadata).")],
    token: Annotated[str | None, typer.Option(help="The name prompts will say, e.g. acme-bottle (default: OUT's stem); "
                                                   "a made-up word, not an ordinary one.")] = None,
    model: BaseModelOpt = None,
    vectors: Annotated[int, typer.Option(min=1, max=75, help="Vectors per token (more: more detail, more prompt room).")] = 4,
    init_text: Annotated[str | None, typer.Option(help="What the vectors start as (default: the class word).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 1000,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate (A1111's default).")] = 5e-3,
    batch_size: BatchOpt = 1,
    resolution: ResolutionOpt = None,
    seed: SeedOpt = 0,
    save_every: SaveEveryOpt = 100,
    sample_every: SampleEveryOpt = 0,
    sample_prompt: Annotated[list[str] | None, typer.Option(
        help="A sample prompt (repeatable; default: \"<token> <class word>\" and \"<class word>\").")] = None,
    sample_steps: SampleStepsOpt = 20,
    state_dir: StateDirOpt = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float16 on CUDA, float32 on the CPU), float32, float16, bfloat16.")] = "auto",
    license_id: Annotated[str | None, typer.Option("--license", help="Licence of the embedding (default: the base "
                                                                   "model's); may not allow commercial use that the base does not.")] = None,
    register: RegisterOpt = True,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train a textual-inversion embedding (a few token vectors) of a product; the model's weights stay as they are.
    Killed and run again with the same options, it resumes."""
    settings = {"vectors": vectors, "init_text": init_text, "steps": steps, "lr": lr, "batch_size": batch_size,
                "resolution": resolution, "seed": seed, "save_every": save_every}
    job = _job("embedding", images, trigger, class_word, out, model, settings, state_dir, sample_every, sample_prompt,
               sample_steps, device, dtype, license_id, register, db, config, token=token)
    _train(job, f"embedding {token or out.stem}")


@app.command("dreambooth")
def train_dreambooth_command(
    images: ImagesOpt,
    trigger: TriggerOpt,
    class_word: ClassWordOpt,
    out: Annotated[Path, typer.Option(help="The checkpoint to write (.safetensors), e.g. models/acme-bottle-db.safetensors.")],
    model: BaseModelOpt = None,
    class_prompt: Annotated[str | None, typer.Option(help="Prompt of the class images (default: \"a photo of <class word>\").")] = None,
    class_images: Annotated[int, typer.Option(min=0, help="Class images the base renders for prior preservation (0: none).")] = 100,
    prior_loss_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the class images' loss (0: plain fine-tuning).")] = 1.0,
    class_steps: Annotated[int, typer.Option(min=1, max=150, help="Sampling steps of each class image.")] = 25,
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 800,
    lr: Annotated[float, typer.Option(min=0.0, help="U-Net learning rate.")] = 5e-6,
    text_encoder: Annotated[bool, typer.Option("--text-encoder/--no-text-encoder", help="Also fine-tune the text encoder.")] = False,
    text_lr: Annotated[float, typer.Option(min=0.0, help="Text-encoder learning rate.")] = 5e-6,
    batch_size: BatchOpt = 1,
    resolution: ResolutionOpt = None,
    seed: SeedOpt = 0,
    save_every: SaveEveryOpt = 100,
    sample_every: SampleEveryOpt = 0,
    sample_prompt: Annotated[list[str] | None, typer.Option(
        help="A sample prompt (repeatable; default: \"<trigger> <class word>\" and \"<class word>\").")] = None,
    sample_steps: SampleStepsOpt = 20,
    state_dir: Annotated[Path | None, typer.Option(help="Resumable state, class images and samples (default: OUT's "
                                                        "folder/.train-<stem>; the state of SD 1.5 is ~10 GB).")] = None,
    device: DeviceOpt = "auto",
    mixed_precision: MixedOpt = "no",
    gradient_checkpointing: CheckpointingOpt = False,
    use_ema: Annotated[bool, typer.Option(help="Export an exponential moving average of the U-Net's weights.")] = False,
    license_id: Annotated[str | None, typer.Option("--license", help="Licence of the checkpoint (default: the base "
                                                                   "model's); may not allow commercial use that the base does not.")] = None,
    register: RegisterOpt = True,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune the whole U-Net on a product (DreamBooth, with prior preservation) into a checkpoint that campaigns
    use as their model (adforge run --model OUT). Killed and run again with the same options, it resumes."""
    settings = {"class_prompt": class_prompt, "num_class_images": class_images, "prior_loss_weight": prior_loss_weight,
                "class_steps": class_steps, "steps": steps, "lr": lr, "train_text_encoder": text_encoder,
                "text_lr": text_lr, "batch_size": batch_size, "resolution": resolution, "seed": seed,
                "save_every": save_every, "mixed_precision": mixed_precision,
                "gradient_checkpointing": gradient_checkpointing, "use_ema": use_ema}
    # float32 always: AdamW steps of ~5e-6 vanish in half-precision weights (mixed precision gives the speed).
    job = _job("dreambooth", images, trigger, class_word, out, model, settings, state_dir, sample_every, sample_prompt,
               sample_steps, device, "float32", license_id, register, db, config)
    _train(job, f"DreamBooth {out.stem}")

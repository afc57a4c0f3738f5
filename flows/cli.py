"""The ``adforge`` command line."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Campaign briefs in, reviewed AI image variants out.")
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """adforge: render, store and audit AI image variants."""


def _open_image(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise typer.BadParameter(f"{what} {path} not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise typer.BadParameter(f"{what} {path} is not a readable image ({exc})") from None


def _next_index(out: Path) -> int:
    """A1111-style running number: continue after the highest existing ``NNNNN-*.png``, never overwrite."""
    highest = -1
    if out.is_dir():
        for p in out.iterdir():
            m = re.match(r"^(\d{5,})-", p.name)
            if m:
                highest = max(highest, int(m.group(1)))
    return highest + 1


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt, with A1111 weights: (word), [word], (word:1.3), BREAK.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", envvar="ADFORGE_MODEL", help="SD 1.x single-file checkpoint; default: the bundled demo model."),
    ] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    sampler: Annotated[str, typer.Option(help="Euler, Euler a, DPM++ 2M, DPM++ 2M Karras or DDIM.")] = "DPM++ 2M Karras",
    steps: Annotated[int, typer.Option(min=1, max=500)] = 25,
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Classifier-free guidance scale.")] = 7.0,
    seed: Annotated[int, typer.Option(help="First seed; image i gets seed+i. -1 picks one at random.")] = -1,
    width: Annotated[int | None, typer.Option(min=8, help="Default: the init image's width, else the model's native size.")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="Default: the init image's height, else the model's native size.")] = None,
    n: Annotated[int, typer.Option("-n", "--n-images", min=1, help="Number of images (seeds seed..seed+n-1).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per U-Net batch; results do not depend on it.")] = 4,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out"),
    init_image: Annotated[Path | None, typer.Option(help="img2img / inpaint source image.")] = None,
    strength: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Denoising strength (default 0.75; 1.0 when outpainting).")
    ] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask: white = repaint. Needs --init-image.")] = None,
    mask_blur: Annotated[int, typer.Option(min=0)] = 4,
    outpaint: Annotated[
        str | None, typer.Option(help="Extend the canvas of --init-image, e.g. left:128 or left:128,top:64.")
    ] = None,
    vae: Annotated[Path | None, typer.Option(help="Separate VAE file to use instead of the checkpoint's.")] = None,
    clip_skip: Annotated[int, typer.Option(min=1, help="2 = penultimate CLIP layer, as many anime models want.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option(help="Allow .ckpt pickles (weights-only unpickling); trust the source.")] = False,
) -> None:
    """Render images from a prompt (txt2img, img2img, inpaint, outpaint) into PNGs with A1111 infotext."""
    # Imported here so `adforge --help` stays instant (torch takes seconds to import).
    from engine.checkpoint import CheckpointError
    from engine.image_ops import Outpaint, outpaint_canvas
    from engine.pipeline import GenerationRequest, Pipeline, with_seeds
    from storage.image_metadata import encode_png, format_infotext, write_atomic, xmp_packet

    from engine.bundled import bundled_model_path

    if model is None:
        model = bundled_model_path()
        if not model.exists():
            raise typer.BadParameter(
                f"no model given and the bundled model {model} is missing: pass --model PATH.safetensors, set "
                "ADFORGE_MODEL, or rebuild it with `adforge train demo`",
                param_hint="--model",
            )
    if mask is not None and init_image is None:
        raise typer.BadParameter("--mask needs --init-image", param_hint="--mask")
    if outpaint is not None and init_image is None:
        raise typer.BadParameter("--outpaint needs --init-image", param_hint="--outpaint")
    if outpaint is not None and mask is not None:
        raise typer.BadParameter("--outpaint makes its own mask; drop --mask", param_hint="--outpaint")

    try:
        with console.status(f"loading {model.name}"):
            pipe = Pipeline.load(model, vae=vae, device=device, dtype=dtype, allow_pickle=allow_pickle, max_batch_size=batch_size)
    except (CheckpointError, ValueError) as exc:
        # soft_wrap: keep paths and keys on one line; escape: key names look like Rich markup ("[key ...]").
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None

    init = _open_image(init_image, "init image") if init_image else None
    mask_img = _open_image(mask, "mask") if mask else None
    if init is not None and outpaint is not None:
        try:
            pad = Outpaint.parse(outpaint).rounded(init.size)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--outpaint") from None
        init, mask_img = outpaint_canvas(init, pad)
        width, height = init.size
        strength = 1.0 if strength is None else strength
    elif init is not None:
        # img2img keeps the source's size unless told otherwise (rounded down to the VAE's multiple of 8).
        width = width or max(8, init.width // 8 * 8)
        height = height or max(8, init.height // 8 * 8)
    width, height = width or pipe.models.native_size, height or pipe.models.native_size
    if strength is None:
        strength = 0.75
    if init is not None and strength == 0.0:
        raise typer.BadParameter("strength 0 would change nothing; use a value in (0, 1]", param_hint="--strength")
    if seed < 0:
        seed = secrets.randbelow(2**32)

    base = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg,
        sampler=sampler,
        clip_skip=clip_skip,
        init_image=init,
        strength=strength,
        mask=mask_img,
        mask_blur=mask_blur,
    )
    try:
        base.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    requests = with_seeds(base, n)
    with Progress(
        TextColumn("[bold]rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("render", total=None)

        def on_step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        results = pipe.generate(requests, progress=on_step)

    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    written: list[Path] = []
    for result in results:
        r = result.request
        infotext = format_infotext(r.prompt, r.negative_prompt, result.parameters)
        xmp = xmp_packet({"Model": pipe.models.checkpoint.name, "ModelSHA256": pipe.models.checkpoint.sha256})
        path = out / f"{index:05d}-{r.seed}.png"
        write_atomic(path, encode_png(result.image, infotext, xmp))
        written.append(path)
        index += 1
    for path in written:
        typer.echo(str(path))
    console.print(f"[green]wrote {len(written)} image(s) to {out}/[/green]")


models_app = typer.Typer(no_args_is_help=True, help="Model files: inspect, make random test checkpoints.")
app.add_typer(models_app, name="models")


@models_app.command("init-random")
def models_init_random(
    path: Annotated[Path, typer.Argument(help="Where to write the .safetensors file.")],
    preset: Annotated[str, typer.Option(help="tiny (a few MB, instant) or sd15 (real SD 1.5 shapes, ~4.3 GB).")] = "tiny",
    seed: Annotated[int, typer.Option()] = 0,
    inpaint: Annotated[bool, typer.Option(help="9-channel inpainting U-Net.")] = False,
    native_size: Annotated[
        int | None, typer.Option(min=8, help="Resolution recorded as the model's native size (default: 128 tiny, 512 sd15).")
    ] = None,
) -> None:
    """Write a random-weight SD 1.x checkpoint in the real single-file layout.

    It renders noise by design: use it to smoke-test a machine, the loader and the pipeline, or to benchmark
    at real SD 1.5 shapes, without downloading anything."""
    from engine.random_checkpoint import write_random_sd1

    try:
        # Random numbers made by our own code: we can license them, so runs may use the file for any purpose.
        size = native_size or (512 if preset == "sd15" else 128)
        write_random_sd1(path, preset, seed=seed, inpaint=inpaint,
                         metadata={"modelspec.title": path.stem, "modelspec.license": "Apache-2.0", "adforge.native_size": str(size)})
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from None
    typer.echo(str(path))


@models_app.command("init-random-upscaler")
def models_init_random_upscaler(
    path: Annotated[Path, typer.Argument(help="Where to write it: .safetensors or .pth.")],
    arch: Annotated[str, typer.Option(help="esrgan (RRDBNet, as RealESRGAN_x4plus) or compact (Real-ESRGAN Compact).")] = "esrgan",
    scale: Annotated[int, typer.Option(help="2 or 4.")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a small random-weight super-resolution file in a real layout (spandrel loads it like a downloaded one).

    It upscales into noise by design: use it to try upscale chains, tiling and licences without downloading
    anything. The .safetensors file declares Apache-2.0 (our own random numbers); a .pth carries no metadata."""
    from engine.upscale.random_models import random_compact, random_esrgan, write_upscaler

    if scale not in (2, 4):
        raise typer.BadParameter("2 or 4", param_hint="--scale")
    nets = {"esrgan": lambda: random_esrgan(num_filters=16, num_blocks=1, scale=scale, seed=seed),
            "compact": lambda: random_compact(num_feat=16, num_conv=4, scale=scale, seed=seed)}
    if arch not in nets:
        raise typer.BadParameter("esrgan or compact", param_hint="--arch")
    safetensors = path.suffix.lower() in (".safetensors", ".sft")
    metadata = {"modelspec.title": path.stem, "modelspec.license": "Apache-2.0"} if safetensors else None
    try:
        write_upscaler(nets[arch](), path, metadata)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATH") from None
    typer.echo(str(path))


@models_app.command("inspect")
def models_inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint or upscaler file.")],
    allow_pickle: Annotated[bool, typer.Option(help="Allow .ckpt pickles (weights-only unpickling).")] = False,
) -> None:
    """Family, architecture read from the tensor shapes, and hashes of a checkpoint (without loading it) or of an
    upscaler (its architecture and scale, as spandrel reads them)."""
    from engine.checkpoint import CheckpointError, a1111_short_hash, detect_family, file_sha256, open_state_dict
    from engine.upscale.chain import MODEL_SUFFIXES
    from engine.upscale.models import UpscalerError, inspect_upscaler, read_upscaler_state_dict

    try:
        sd = open_state_dict(path, allow_pickle)
        family = detect_family(sd)
    except CheckpointError as exc:
        if path.suffix.lower() in MODEL_SUFFIXES and exc.key is None:
            try:
                up = inspect_upscaler(path)
            except UpscalerError:
                pass
            else:
                typer.echo(f"file:        {path}")
                typer.echo(f"upscaler:    {up.arch}, {up.scale}x ({up.purpose})")
                typer.echo(f"tensors:     {len(read_upscaler_state_dict(path)[0])}")
                typer.echo(f"sha256:      {up.sha256}")
                typer.echo(f"model hash:  {up.short_hash}")
                return
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    sha = file_sha256(path)
    typer.echo(f"file:        {path}")
    typer.echo(f"family:      {family.name}" + ("" if family.supported else f" (unsupported: {family.reason})"))
    typer.echo(f"tensors:     {len(sd)}")
    typer.echo(f"sha256:      {sha}")
    typer.echo(f"model hash:  {a1111_short_hash(sha)}")


from flows.cli_campaign import register as _register_campaign_commands  # noqa: E402  (needs app and models_app)
from flows.cli_review import register as _register_review_commands  # noqa: E402  (gallery, users, export, results, audit)

_register_campaign_commands(app, models_app, console)
_register_review_commands(app, console)

train_app = typer.Typer(no_args_is_help=True, help="Training: the bundled demo model.")
app.add_typer(train_app, name="train")


@train_app.command("demo")
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
    from engine.demo.recipe import DemoRecipe, train_demo

    recipe = DemoRecipe() if scale == 1.0 else DemoRecipe().scaled(scale)
    work = work_dir or out.parent / (".demo-train" if scale == 1.0 else f".demo-train-{scale:g}")
    try:
        report = train_demo(recipe, out, work_dir=work, log=lambda m: console.print(m, soft_wrap=True, markup=False), threads=threads,
                            start_from=start_from)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    typer.echo(f"{out} ({report['total_seconds']:.0f} s)")


if __name__ == "__main__":
    app()

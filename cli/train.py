"""``adforge train``: training the bundled demo model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import console, fail

__all__ = ["app", "train_demo_command"]

app = typer.Typer(no_args_is_help=True, help="Training: the bundled demo model.")


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

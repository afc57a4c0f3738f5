"""The one way a command fails: a one-line red message on standard error, then an exit code.

Messages are escaped (key names and paths look like Rich markup, e.g. ``[key ...]``) and soft-wrapped (paths and
keys stay on one line, whatever the terminal's width).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["console", "fail", "open_image", "print_problems", "rejected"]

console = Console(stderr=True)


def fail(message: object, code: int = 1) -> typer.Exit:
    """Print ``error: message`` and return the exit to raise: ``raise fail(exc, 2) from None``."""
    console.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)
    return typer.Exit(code)


def rejected(what: str, problems: list, consequence: str | None = None, code: int = 2) -> typer.Exit:
    """An input refused as a whole (a brief, a results file): the count, what it means, then one line per problem."""
    tail = f"; {consequence}" if consequence else ""
    console.print(f"[red]{what} rejected[/red] ({len(problems)} problem(s)){tail}:")
    for p in problems:
        console.print(f"  {escape(str(p))}", soft_wrap=True)
    return typer.Exit(code)


def print_problems(problems: Iterable[object], title: str) -> None:
    """Problems that did not stop the command (rows skipped): a yellow title with their count, one line each."""
    problems = [str(p) for p in problems]
    if not problems:
        return
    console.print(f"[yellow]{title} ({len(problems)}):[/yellow]")
    for p in problems:
        console.print(f"  {escape(p)}", soft_wrap=True)


def open_image(path: Path, what: str, option: str) -> Image.Image:
    """The image at ``path``, decoded; a one-line BadParameter on ``option`` naming ``what`` if it is missing or not
    an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise typer.BadParameter(f"{what} {path} not found", param_hint=option) from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise typer.BadParameter(f"{what} {path} is not a readable image ({exc})", param_hint=option) from None

"""Train the bundled model's layout ControlNet from ``demo/controlnet_recipe.yaml``::

    .venv/bin/python -m demo.controlnet_train                      # -> models/controlnet/adforge-demo-scribble.safetensors
    .venv/bin/python -m demo.controlnet_train --steps 20 --out /tmp/cn.safetensors --state /tmp/cn-state
    adforge train controlnet                                       # the same, from the CLI

The generic trainer (engine.training.controlnet_trainer) on the demo's (scene, layout sketch, caption) triples
(demo.controlnet_data). Killed and started again with the same ``--state`` folder, it resumes where it was saved.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import yaml

from demo.controlnet_data import layout_samples
from engine.bundled import bundled_model_path
from engine.loading import load_checkpoint
from engine.training.controlnet_trainer import (
    ControlNetTrainingConfig, controlnet_metadata, save_controlnet, train_controlnet,
)

RECIPE_FILE = Path(__file__).with_name("controlnet_recipe.yaml")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "controlnet" / "adforge-demo-scribble.safetensors"
DEFAULT_STATE = ROOT / "models" / ".demo-train" / "controlnet-state"


@dataclass(frozen=True)
class ControlNetRecipe:
    data_seed: int
    scenes: int
    size: int
    training: ControlNetTrainingConfig


def load_recipe(path: str | os.PathLike[str] = RECIPE_FILE) -> ControlNetRecipe:
    """The recipe in ``path``; ValueError naming an unknown setting (a typo must not silently train the default)."""
    raw = yaml.safe_load(Path(path).read_text())
    known = {f.name for f in fields(ControlNetTrainingConfig)}
    training = dict(raw.pop("training", {}))
    unknown = sorted(set(training) - known) + sorted(set(raw) - {"data_seed", "scenes", "size"})
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}")
    training = {k: float(v) if k in ("lr", "weight_decay", "max_grad_norm") else v for k, v in training.items()}
    config = ControlNetTrainingConfig(resolution=int(raw["size"]), **training)
    return ControlNetRecipe(int(raw["data_seed"]), int(raw["scenes"]), int(raw["size"]), config)


def train_demo_controlnet(
    out: Path = DEFAULT_OUT, *, recipe: ControlNetRecipe | None = None, state_dir: Path = DEFAULT_STATE,
    model: Path | None = None, steps: int | None = None, scenes: int | None = None, threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the recipe's ControlNet for the bundled model (or ``model``) and write it to ``out``; ``steps`` and
    ``scenes`` override the recipe's (trial runs). Returns what it measured (steps, s/step, wall, load average)."""
    torch.set_num_threads(threads)
    recipe = recipe or load_recipe()
    config = recipe.training if steps is None else replace(recipe.training, steps=steps)
    scenes = scenes or recipe.scenes
    load = os.getloadavg()
    t0 = time.time()
    models = load_checkpoint(model or bundled_model_path())
    samples = layout_samples(recipe.data_seed, scenes, recipe.size)
    every = max(1, config.steps // 40)

    def on_step(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            log(f"step {step}/{total} loss {loss:.4f}  {time.time() - t0:.0f} s  load {os.getloadavg()[0]:.1f}")

    result = train_controlnet(models, samples, config, state_dir=state_dir, on_step=on_step)
    meta = controlnet_metadata(models, result, {
        "modelspec.title": Path(out).stem,
        "adforge.recipe": yaml.safe_dump({"data_seed": recipe.data_seed, "scenes": scenes, "size": recipe.size},
                                         sort_keys=True).strip(),
    })
    save_controlnet(out, result.model, meta)
    report = {"out": str(out), "bytes": Path(out).stat().st_size, "steps": result.steps,
              "s_per_step": result.seconds / max(1, result.steps - result.resumed_from),
              "training_seconds": result.seconds, "wall_seconds": time.time() - t0,
              "load_start": load, "load_end": os.getloadavg()}
    log(f"wrote {out} ({report['bytes'] / 1e6:.2f} MB); {result.steps} steps, {report['s_per_step']:.3f} s/step, "
        f"training {result.seconds:.0f} s, wall {report['wall_seconds']:.0f} s; load average "
        f"{' / '.join(f'{x:.1f}' for x in load)} at start, {' / '.join(f'{x:.1f}' for x in report['load_end'])} at end")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE_FILE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE, help="resumable training state folder")
    ap.add_argument("--model", type=Path, default=bundled_model_path())
    ap.add_argument("--steps", type=int, help="override the recipe's steps (trial runs)")
    ap.add_argument("--scenes", type=int, help="override the recipe's scene count (trial runs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared CPU two threads wait on each other more than they gain)")
    args = ap.parse_args(argv)
    train_demo_controlnet(args.out, recipe=load_recipe(args.recipe), state_dir=args.state, model=args.model,
                          steps=args.steps, scenes=args.scenes, threads=args.threads,
                          log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()

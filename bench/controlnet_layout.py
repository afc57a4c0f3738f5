"""Does the bundled layout ControlNet put objects where the sketch puts them? (issue 23's proof item)

Run from the repository root::

    .venv/bin/python bench/controlnet_layout.py                        # 100 held-out scenes, shipped ControlNet
    .venv/bin/python bench/controlnet_layout.py --n 40 --strength 1.5 --report bench/_work/cn.json

For ``--n`` one-object scenes drawn from seeds the ControlNet never trained on (demo/controlnet_data.py with
``--seed``), each at a random one of demo.scenes.POSITIONS, it renders the position-free caption ("a large red
circle, on a blue background") with the scene's layout sketch through the ControlNet (``ControlUse(kind="scribble")``)
and, with the same seeds, without it; 25-step DPM++ 2M Karras at the model's native size, CFG 6 as
bench/demo_adherence.py. demo/evaluate.score_image scores where the object landed (its position detection, named by
the nearest of the five positions) and whether its colour, shape and the background are right. Prints each share
with its 95 % Wilson interval, the load average at start and end, and the wall time; ``--report`` writes JSON.

Target: position >= 85 % with the ControlNet; without it the caption says nothing of position, so the model's own
habit decides and the share is near chance (1 in 5) -- the bench also prints where the objects landed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.phrasing_adherence import wilson  # noqa: E402
from demo.controlnet_data import layout_scene, layout_sketch  # noqa: E402
from demo.evaluate import score_image  # noqa: E402
from demo.scenes import Scene  # noqa: E402
from engine.adapters.refs import AdapterFile  # noqa: E402
from engine.bundled import bundled_model_path  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.requests import ControlUse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONTROLNET = ROOT / "models" / "controlnet" / "adforge-demo-scribble.safetensors"
ATTRIBUTES = ("position", "object_color", "shape", "background")
TARGET = 0.85


def held_out_scenes(seed: int, n: int) -> list[Scene]:
    """One-object scenes from ``seed`` (the training data's is demo/controlnet_recipe.yaml's data_seed)."""
    rng = random.Random(seed)
    return [layout_scene(rng, n_objects=1) for _ in range(n)]


def render(pipe: Pipeline, scenes: list[Scene], control: Path | None, *, seed: int, steps: int, cfg: float,
           strength: float) -> list:
    size = pipe.models.native_size
    net = AdapterFile(control.stem, str(control)) if control is not None else None
    requests = []
    for i, s in enumerate(scenes):
        controls = () if net is None else (ControlUse(net, layout_sketch(s.objects, size), kind="scribble",
                                                      strength=strength),)
        requests.append(GenerationRequest(s.caption, seed=seed + i, width=size, height=size, steps=steps,
                                          cfg_scale=cfg, sampler="DPM++ 2M Karras", controls=controls))
    return [r.image for r in pipe.generate(requests)]


def tally(scenes: list[Scene], images: list) -> dict:
    hits = {a: 0 for a in ATTRIBUTES}
    landed: Counter[str] = Counter()
    for scene, image in zip(scenes, images):
        score = score_image(image, scene)
        for a in ATTRIBUTES:
            hits[a] += bool(getattr(score, a))
        obj = score.detected.get("object")
        landed[obj["position"] if obj else "none"] += 1
    n = len(scenes)
    out: dict = {a: {"right": hits[a], "n": n, "share": hits[a] / n, "wilson95": wilson(hits[a], n)} for a in ATTRIBUTES}
    out["landed"] = dict(sorted(landed.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=9000, help="scene and render seeds (held out from training)")
    ap.add_argument("--model", type=Path, default=bundled_model_path())
    ap.add_argument("--controlnet", type=Path, default=DEFAULT_CONTROLNET)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", type=Path)
    ap.add_argument("--save-images", type=Path, help="folder for the renders (with_*.png, without_*.png)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    load_start, t0 = os.getloadavg(), time.time()
    pipe = Pipeline.load(args.model, device="cpu", dtype="float32")
    scenes = held_out_scenes(args.seed, args.n)
    kw = {"seed": args.seed, "steps": args.steps, "cfg": args.cfg, "strength": args.strength}
    rows = {}
    for label, control in (("with ControlNet", args.controlnet), ("without", None)):
        t = time.time()
        images = render(pipe, scenes, control, **kw)
        rows[label] = {**tally(scenes, images), "seconds": round(time.time() - t, 1)}
        if args.save_images:
            args.save_images.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(args.save_images / f"{label.split()[0]}_{i:03d}.png")
    load_end, wall = os.getloadavg(), time.time() - t0

    sketched = Counter(s.objects[0].position for s in scenes)
    print(f"{args.n} held-out scenes (seed {args.seed}), sketched at {dict(sorted(sketched.items()))}; "
          f"ControlNet {args.controlnet.name} strength {args.strength:g}, {args.steps} steps DPM++ 2M Karras, "
          f"CFG {args.cfg:g}")
    for label, row in rows.items():
        cells = ", ".join(f"{a} {row[a]['share']:.1%} [{row[a]['wilson95'][0]:.0%}-{row[a]['wilson95'][1]:.0%}]"
                          for a in ATTRIBUTES)
        print(f"  {label:16s} {cells}; landed {row['landed']} ({row['seconds']:.0f} s)")
    met = rows["with ControlNet"]["position"]["share"] >= TARGET
    print(f"position target >= {TARGET:.0%} with the ControlNet: {'met' if met else 'NOT met'}")
    print(f"load average {' / '.join(f'{x:.1f}' for x in load_start)} at start, "
          f"{' / '.join(f'{x:.1f}' for x in load_end)} at end; wall {wall:.0f} s")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({
            "n": args.n, "seed": args.seed, "controlnet": str(args.controlnet), "strength": args.strength,
            "steps": args.steps, "cfg": args.cfg, "sketched": dict(sorted(sketched.items())), "rows": rows,
            "target": TARGET, "met": met, "load_start": load_start, "load_end": load_end, "wall_s": round(wall, 1),
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How well a demo model follows phrasings its caption grammar never used (demo/phrasings.py, held-out templates).

Run from the repository root::

    .venv/bin/python bench/phrasing_adherence.py                       # bundled model, 128 prompts
    .venv/bin/python bench/phrasing_adherence.py --model bench/_work/phrasing/tuned.safetensors --n 64

Renders the held-out phrasing set (one-object scenes, each caption in one of the held-out templates in turn, a
quarter with a white object) with 25-step DPM++ 2M Karras at CFG 6 and the model's native size, scores every render
with ``demo.evaluate.score_image`` and prints the share right of background, object colour, shape and position
(position only over the captions that state one: a template without a position phrase leaves it free), and of
"all stated attributes right", each with its 95 % Wilson interval; then the same split by template and for white
objects. Prints the load average with the timings (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from demo.evaluate import score_image  # noqa: E402
from demo.phrasings import Phrased, held_out_set  # noqa: E402
from engine.bundled import bundled_model_path  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402

ATTRIBUTES = ("background", "object_color", "shape", "position", "all stated")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a share ``hits / n``."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(items: list[Phrased], scores: list) -> dict[str, tuple[int, int]]:
    """attribute -> (right, scored)."""
    out = {a: [0, 0] for a in ATTRIBUTES}
    for item, score in zip(items, scores):
        for a in ("background", "object_color", "shape"):
            out[a][0] += bool(getattr(score, a))
            out[a][1] += 1
        if item.states_position:
            out["position"][0] += bool(score.position)
            out["position"][1] += 1
        stated = score.background and score.object_color and score.shape and (score.position or not item.states_position)
        out["all stated"][0] += bool(stated)
        out["all stated"][1] += 1
    return {a: (r, n) for a, (r, n) in out.items()}


def fmt(right: int, n: int) -> str:
    if n == 0:
        return "-"
    lo, hi = wilson(right, n)
    return f"{right / n:6.1%} [{lo:.0%}-{hi:.0%}] ({right}/{n})"


def measure(pipe: Pipeline, items: list[Phrased], cfg: float, steps: int, seed: int) -> list:
    size = pipe.models.native_size
    requests = [GenerationRequest(p.text, seed=seed + i, width=size, height=size, steps=steps, cfg_scale=cfg,
                                  sampler="DPM++ 2M Karras") for i, p in enumerate(items)]
    return [score_image(r.image, p.scene) for r, p in zip(pipe.generate(requests), items)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model_path())
    ap.add_argument("--n", type=int, default=128, help="prompts")
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=5000, help="draws the held-out scenes and the render seeds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.n < 1 or args.steps < 1:
        ap.error("--n and --steps must be at least 1")
    if not args.model.is_file():
        ap.error(f"--model {args.model}: no such file")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model, device="cpu", dtype="float32", max_batch_size=16)
    print(f"model {args.model.name} ({pipe.models.checkpoint.short_hash}), {args.n} held-out phrasings, "
          f"{args.steps}-step DPM++ 2M Karras, CFG {args.cfg:g}, {torch.get_num_threads()} threads")
    items = held_out_set(args.seed, args.n)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    scores = measure(pipe, items, args.cfg, args.steps, args.seed)
    seconds = time.perf_counter() - t0
    total = tally(items, scores)
    print(f"\n{'set':34s}" + "".join(f"{a:>30s}" for a in ATTRIBUTES))
    print(f"{'held-out phrasings':34s}" + "".join(f"{fmt(*total[a]):>30s}" for a in ATTRIBUTES))
    for name in dict.fromkeys(p.template for p in items):
        picked = [i for i, p in enumerate(items) if p.template == name]
        sub = tally([items[i] for i in picked], [scores[i] for i in picked])
        print(f"{name:34s}" + "".join(f"{fmt(*sub[a]):>30s}" for a in ATTRIBUTES))
    white = [i for i, p in enumerate(items) if p.scene.objects[0].color == "white"]
    sub = tally([items[i] for i in white], [scores[i] for i in white])
    print(f"{'white objects':34s}" + "".join(f"{fmt(*sub[a]):>30s}" for a in ATTRIBUTES))
    print(f"\n{args.n} renders in {seconds:.0f} s; load average before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

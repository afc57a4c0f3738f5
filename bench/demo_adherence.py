"""How well the bundled demo model follows prompts, scored by pixel analysis (demo/evaluate.py).

Run from the repository root::

    .venv/bin/python bench/demo_adherence.py                 # bundled model, 128 prompts per set
    .venv/bin/python bench/demo_adherence.py --n 200 --cfg 7 --model models/adforge-demo.safetensors

It renders one-object scenes (captions as in training; a gradient's caption states its direction, "vertical"
= first colour at the top, "horizontal" = at the left) with 25-step DPM++ 2M Karras at the model's native
size, and prints, per attribute (background colour, object colour, shape, position), the share scored right
(and the background split into solid and gradient scenes):
for combinations seen in training, for the held-out (colour, shape) pairs never seen together, and the same
prompts at CFG 1 (guidance off), which must score clearly lower. Then negative prompts: the share of red
pixels with and without the negative prompt "red". Last, seconds for one 25-step image (batch 1), against the
2 s target. Targets: background >= 95 %, object colour >= 90 %, shape >= 80 %, position >= 85 %.

Sets are 128 prompts by default: at 64 the shape share moved by 10 points between two sets of seeds (measured:
79.7 % on this bench's seeds, 69.5 % on 128 others, same model), which is about its sampling error (a share p of
n prompts is known to +-1.96 sqrt(p (1 - p) / n), printed). The shape share is also split by shape and size.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from demo.evaluate import color_shares, score_image  # noqa: E402
from demo.scenes import Scene, random_scene  # noqa: E402
from engine.bundled import bundled_model_path  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402

ATTRIBUTES = ("background", "object_color", "shape", "position")
TARGETS = {"background": 0.95, "object_color": 0.90, "shape": 0.80, "position": 0.85}


def scenes(seed: int, n: int, held_out: bool) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, held_out=held_out, n_objects=1) for _ in range(n)]


def accuracy(pipe: Pipeline, items: list[Scene], cfg: float, steps: int, seed: int) -> dict[str, float]:
    size = pipe.models.native_size
    requests = [
        GenerationRequest(s.caption, seed=seed + i, width=size, height=size, steps=steps, cfg_scale=cfg, sampler="DPM++ 2M Karras")
        for i, s in enumerate(items)
    ]
    results = pipe.generate(requests)
    hits = {a: 0 for a in ATTRIBUTES}
    by_shape: dict[str, list[int]] = {}  # "size shape" -> [shape right, scenes]
    kinds = {"solid": [0, 0], "gradient": [0, 0]}  # background right, scenes
    for scene, result in zip(items, results):
        score = score_image(result.image, scene)
        for a in ATTRIBUTES:
            hits[a] += bool(getattr(score, a))
        kind = kinds["gradient" if scene.is_gradient else "solid"]
        kind[0] += bool(score.background)
        kind[1] += 1
        obj = scene.objects[0]
        cell = by_shape.setdefault(f"{obj.size} {obj.shape}", [0, 0])
        cell[0] += bool(score.shape)
        cell[1] += 1
    acc = {a: hits[a] / len(items) for a in ATTRIBUTES}
    acc["by background kind"] = ", ".join(f"{k} {right}/{n}" for k, (right, n) in kinds.items())
    acc["shape by size and shape"] = ", ".join(f"{k} {right}/{n}" for k, (right, n) in sorted(by_shape.items()))
    return acc


def mean_shares(pipe: Pipeline, prompts: list[str], negative: str, steps: int, cfg: float, seed: int) -> dict[str, float]:
    """Each named colour's mean share of the pixels of the prompts' renders."""
    size = pipe.models.native_size
    requests = [
        GenerationRequest(p, seed=seed + i, negative_prompt=negative, width=size, height=size, steps=steps, cfg_scale=cfg)
        for i, p in enumerate(prompts)
    ]
    shares = [color_shares(r.image) for r in pipe.generate(requests)]
    return {c: sum(s[c] for s in shares) / len(shares) for c in shares[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=bundled_model_path())
    ap.add_argument("--n", type=int, default=128, help="prompts per set")
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    for name in ("n", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.model.is_file():
        ap.error(f"--model {args.model}: no such file")

    pipe = Pipeline.load(args.model, device="cpu", dtype="float32", max_batch_size=16)
    print(f"model {args.model.name} ({pipe.models.checkpoint.short_hash}), native {pipe.models.native_size}px, "
          f"{args.steps}-step DPM++ 2M Karras, {torch.get_num_threads()} threads")

    rows = {
        f"trained combos, CFG {args.cfg:g}": accuracy(pipe, scenes(args.seed, args.n, False), args.cfg, args.steps, args.seed),
        f"held-out combos, CFG {args.cfg:g}": accuracy(pipe, scenes(args.seed + 1, args.n, True), args.cfg, args.steps, args.seed),
        "trained combos, CFG 1": accuracy(pipe, scenes(args.seed, args.n, False), 1.0, args.steps, args.seed),
    }
    print(f"\n{'set':34s}" + "".join(f"{a:>14s}" for a in ATTRIBUTES))
    for name, acc in rows.items():
        print(f"{name:34s}" + "".join(f"{acc[a]:>13.1%} " for a in ATTRIBUTES) + f"  background: {acc['by background kind']}")
    print(f"{'target':34s}" + "".join(f"{TARGETS[a]:>13.0%} " for a in ATTRIBUTES))
    print(f"{'sampling error, +- points (95 %)':34s}"
          + "".join(f"{196 * math.sqrt(p * (1 - p) / args.n):>13.1f}  " for p in (rows[next(iter(rows))][a] for a in ATTRIBUTES)))
    for name, acc in list(rows.items())[:2]:
        print(f"shape right by size and shape, {name}: {acc['shape by size and shape']}")
    guided, unguided = rows[f"trained combos, CFG {args.cfg:g}"], rows["trained combos, CFG 1"]
    print("CFG effect (guided / CFG 1):", ", ".join(f"{a} {guided[a] / max(unguided[a], 1e-9):.2f}x" for a in ATTRIBUTES))

    red_prompts = [s.caption for s in scenes(args.seed + 2, args.n // 2, False) if "red" in s.caption][: max(4, args.n // 4)]
    free = ["a large circle in the center", "a small square on the left", "a star at the top", "a hexagon on the right"] * max(1, args.n // 16)
    red_plain = mean_shares(pipe, red_prompts, "", args.steps, args.cfg, args.seed)
    free_plain = mean_shares(pipe, free, "", args.steps, args.cfg, args.seed)
    # Red, and the colour the model draws most when the prompt names none (red may hardly come up there at all).
    most = max(free_plain, key=free_plain.get)
    for colour, label, prompts, plain_shares in (("red", "prompts naming red", red_prompts, red_plain),
                                                 ("red", "prompts naming no colour", free, free_plain),
                                                 (most, "prompts naming no colour", free, free_plain)):
        plain = plain_shares[colour]
        negative = mean_shares(pipe, prompts, colour, args.steps, args.cfg, args.seed)[colour]
        print(f"{colour} pixel share, {label} ({len(prompts)}): no negative {plain:.3f}, negative '{colour}' "
              f"{negative:.3f} (ratio {negative / max(plain, 1e-9):.2f})")

    size = pipe.models.native_size
    req = GenerationRequest("a large red circle in the center, blue background", seed=1, width=size, height=size, steps=25, cfg_scale=args.cfg)
    pipe.generate([req])  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        pipe.generate([req])
        times.append(time.perf_counter() - t)
    print(f"one 25-step {size}x{size} image: {min(times):.2f} s (best of 3), {min(times) / 2.0:.2f}x the 2 s target")


if __name__ == "__main__":
    main()

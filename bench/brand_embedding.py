"""Brand fine-tuning proof, embedding half: teach the bundled model the "acme brown" brand colour by textual inversion
and measure what changed (issue 22).

The concept (:mod:`demo.brand_colour`: a colour off the demo palette, the nearest palette colour 42 CIE76 units
away) is drawn into a 16-photo kohya-style folder ("a large acme hexagon on the left, on a blue background"), an
embedding named ``acme-brand`` is trained on the CPU (every model weight frozen), exported to a ``.safetensors``
file and loaded back as a user would (``GenerationRequest.embeddings`` + its name in the prompt). 128x128 renders
through :class:`engine.pipeline.Pipeline`, scored by :func:`demo.brand_colour.colour_present` (the object's colour
within 21 units of the brand colour):

* (a) **present with the trigger**: held-out scenes said with the embedding's name in the colour's place;
* (b) **absent without it**: the same prompts and seeds with the name cut ("a large hexagon on the left, on a blue
  background"), the embedding loaded; and, as the baseline, the base model with the trigger prompt said as the
  plain word "acme";
* (c) **others unchanged**: ordinary demo prompts with the embedding loaded vs. without, same seed
  (:func:`demo.brand_concept.unchanged_score` >= 0.95).

Settings were chosen on ``--eval tune``; the report uses ``--eval final`` (other seeds and scenes). The load average
is printed with every timing: the CPU is shared.

    .venv/bin/python bench/brand_embedding.py [--steps 1500] [--lr 5e-3] [--vectors 4] [--init orange] [--renders 20]
        [--eval tune|final] [--scale full|tiny] [--work bench/_work/embedding] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.brand_training import (  # noqa: E402
    EMBEDDING_NAME, EVAL_SETS, WORK, BenchSettings, _requests, _train_embedding, load,
)
from demo.brand_colour import (  # noqa: E402
    BRAND_RGB, INIT_WORD, PRESENT_DELTA_E, TRIGGER, colour_delta_e, eval_scenes, write_colour_images,
)
from demo.brand_concept import UNCHANGED_THRESHOLD, ordinary_scenes, unchanged_score  # noqa: E402
from demo.scenes import NATIVE_SIZE  # noqa: E402

TARGETS = {"present_with_trigger": 0.7, "present_without_trigger": 0.2, "ordinary_unchanged": 0.8}
# Chosen on --eval tune (demo/NOTES.md): 4 vectors from "orange", A1111's lr, 1,500 steps.
DEFAULTS = BenchSettings(adapter="embedding", class_word=INIT_WORD, steps=1500, lr=5e-3, vectors=4, prior=0)


def run_bench(settings: BenchSettings, work: Path) -> dict:
    import torch

    from engine.bundled import bundled_model_path
    from engine.loading import load_checkpoint
    from engine.pipeline import Pipeline
    from engine.training.image_set import load_image_set

    torch.set_num_threads(settings.threads)
    folder = work / "acme-colour"
    for old in folder.glob("*") if folder.is_dir() else ():
        old.unlink()
    write_colour_images(folder, settings.images, settings.seed)
    models = load_checkpoint(bundled_model_path(), device="cpu")
    # The class word is the embedding's init text: the palette colour nearest in hue.
    image_set = load_image_set(folder, trigger=TRIGGER, class_word=settings.class_word, min_side=NATIVE_SIZE)
    adapter = _train_embedding(models, image_set, settings, work)
    print(f"trained {adapter.steps} steps in {adapter.seconds:.0f} s, load average {load()}; rendering", flush=True)

    base_seed, scene_seed = EVAL_SETS[settings.eval]["seed"], EVAL_SETS[settings.eval]["scenes"]
    n = settings.renders
    concepts = eval_scenes(n, scene_seed + 7)
    seeds = [base_seed + i for i in range(n)]
    ordinary = ordinary_scenes(n, seed=scene_seed)
    o_seeds = [base_seed + 500 + i for i in range(n)]
    named = [c.prompt.replace(f"{TRIGGER} ", f"{EMBEDDING_NAME} ") for c in concepts]
    batches = {
        "trigger": _requests(named, seeds, settings, adapter),
        "no_trigger": _requests([c.without_trigger for c in concepts], seeds, settings, adapter),
        "trigger_base": _requests([c.prompt for c in concepts], seeds, settings, None),
        "ordinary_adapted": _requests([s.caption for s in ordinary], o_seeds, settings, adapter),
        "ordinary_base": _requests([s.caption for s in ordinary], o_seeds, settings, None),
    }
    t0, before = time.perf_counter(), load()
    pipe = Pipeline(models)
    images = {k: [r.image for r in pipe.generate(v)] for k, v in batches.items()}
    seconds = time.perf_counter() - t0
    out = work / "renders"
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("trigger", "no_trigger"):
        for i, im in enumerate(images[kind][:4]):
            im.save(out / f"{kind}-{i}.png")
    distances = {k: [colour_delta_e(im, c.scene) for im, c in zip(images[k], concepts)]
                 for k in ("trigger", "no_trigger", "trigger_base")}

    def share(kind: str) -> float:
        return float(np.mean([d is not None and d < PRESENT_DELTA_E for d in distances[kind]]))

    same = [unchanged_score(a, b) for a, b in zip(images["ordinary_adapted"], images["ordinary_base"])]
    scores = {
        "present_with_trigger": share("trigger"),
        "present_without_trigger": share("no_trigger"),
        "present_trigger_word_base_model": share("trigger_base"),
        "ordinary_unchanged": float(np.mean([s >= UNCHANGED_THRESHOLD - 1e-9 for s in same])),
        "delta_e_median": {k: (float(np.median([d for d in v if d is not None])) if any(d is not None for d in v)
                               else None) for k, v in distances.items()},
        "render_seconds": round(seconds, 1),
        "seconds_per_render": round(seconds / sum(len(v) for v in images.values()), 2),
        "load_during_renders": [before, load()],
        "examples": {"trigger": named[:3], "no_trigger": [c.without_trigger for c in concepts[:3]]},
    }
    met = {k: (scores[k] <= t if k == "present_without_trigger" else scores[k] >= t) for k, t in TARGETS.items()}
    return {
        "settings": asdict(settings), "brand_rgb": BRAND_RGB, "present_delta_e": PRESENT_DELTA_E,
        "training": {"seconds": round(adapter.seconds, 1), "steps": adapter.steps,
                     "final_loss_mean20": round(adapter.final_loss, 5), "load_before": adapter.load_before,
                     "load_after": adapter.load_after, "file": str(adapter.path), "sha256": adapter.sha256},
        "scores": scores, "targets": TARGETS, "met": met,
    }


def print_table(report: dict) -> None:
    s, t, m = report["settings"], report["training"], report["scores"]
    print(f"\nembedding {EMBEDDING_NAME}: {s['vectors']} vectors from {s['class_word']!r}, {s['steps']} steps, "
          f"lr {s['lr']:g}, eval {s['eval']}")
    print(f"training: {t['seconds']:.0f} s, loss(last 20) {t['final_loss_mean20']}, load average "
          f"{t['load_before']} -> {t['load_after']}")
    print(f"renders: {m['render_seconds']} s ({m['seconds_per_render']} s each), load average "
          f"{m['load_during_renders'][0]} -> {m['load_during_renders'][1]}")
    rows = [("(a) brand colour, prompts saying the embedding", m["present_with_trigger"], ">= 0.7"),
            ("(b) brand colour, the same prompts without it", m["present_without_trigger"], "<= 0.2"),
            ("    brand colour, base model, 'acme' as a word", m["present_trigger_word_base_model"], "(0)"),
            ("(c) ordinary prompts unchanged (>= 0.95 pixels)", m["ordinary_unchanged"], ">= 0.8")]
    for name, value, target in rows:
        print(f"  {name:<50} {value:6.3f}  {target}")
    print("median CIE76 distance from the brand colour:", m["delta_e_median"])
    print("targets met:", report["met"], " load average now", load())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--vectors", type=int, default=DEFAULTS.vectors)
    p.add_argument("--init", default=DEFAULTS.class_word, help="the word the vectors start from")
    p.add_argument("--renders", type=int, default=DEFAULTS.renders)
    p.add_argument("--images", type=int, default=DEFAULTS.images, help="training photos to draw")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--eval", choices=tuple(EVAL_SETS), default="final")
    p.add_argument("--scale", choices=("full", "tiny"), default="full",
                   help="tiny: 2 steps, 2 renders, 4 render steps (a smoke run of the code path)")
    p.add_argument("--work", default=None)
    p.add_argument("--report", default=None)
    a = p.parse_args(argv)
    s = replace(DEFAULTS, steps=a.steps, lr=a.lr, vectors=a.vectors, renders=a.renders, seed=a.seed, eval=a.eval,
                class_word=a.init, images=a.images)
    if a.scale == "tiny":
        s = replace(s, steps=2, renders=2, render_steps=4, images=4)
    work = Path(a.work) if a.work else WORK / ("tiny-embedding" if a.scale == "tiny" else "embedding")
    print("load average at start", load())
    report = run_bench(s, work)
    print_table(report)
    out = Path(a.report) if a.report else work / "brand-embedding.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"report: {out}")


if __name__ == "__main__":
    main()

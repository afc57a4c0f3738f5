"""Brand fine-tuning proof on the bundled demo model: teach it the "acme mug" and measure what changed (issue 22).

The concept (:mod:`demo.brand_concept`: a mug with seven black/white bands, a pattern the bundled model has never
drawn) is drawn into a 16-image kohya-style folder, an adapter is trained on the bundled model on the CPU, exported,
and loaded back the way a user would (a LoRA file in ``GenerationRequest.loras`` with its ``<lora:name:w>`` tag).
Then three things are measured on 128x128 renders through :class:`engine.pipeline.Pipeline`:

* (a) **present with the trigger**: share of renders of :data:`~demo.brand_concept.TRIGGER_PROMPTS` said with the
  class word ("acme square on a blue background"; several seeds) where :func:`~demo.brand_concept.concept_present`
  finds the bands;
* (b) **absent without it**: class prompts without the trigger (:func:`class_prompts`, held-out scenes and seeds:
  the class word stays, the hardest case), and (b') the ordinary demo prompts, both with the adapter;
* (c) **others unchanged**: ordinary demo prompts (:func:`~demo.brand_concept.ordinary_scenes`) with the adapter
  vs. without it, same seed: share of prompts with :func:`~demo.brand_concept.unchanged_score` >= 0.95, and the
  mean :func:`~demo.brand_concept.scene_agreement`.

Settings were tuned on ``--eval tune`` seeds and prompts; the reported numbers use ``--eval final`` (other seeds,
other ordinary scenes). Outputs go to ``bench/_work/`` (git-ignored), the report to
``bench/_work/brand-training.json``. The load average is printed with every timing: the CPU is shared.

    .venv/bin/python bench/brand_training.py [--adapter lora|embedding] [--class-word square] [--steps 800]
        [--rank 8] [--lr 5e-4] [--text-encoder --text-lr 1e-3] [--conv | --no-conv] [--prior 16]
        [--weight 0.7] [--pivotal 4 --pivotal-lr 5e-2] [--vectors 4] [--renders 20]
        [--eval tune|final] [--scale full|tiny] [--work bench/_work] [--report bench/_work/brand-training.json]

DreamBooth setup: trigger "acme", class word ``--class-word square`` (the shape the bundled model knows that is
closest to the mug's rounded-rectangle body; "mug" is a word it never saw), captions "acme square, a large acme square
on the left, on a blue background"; regularisation images (``--prior``) are base-model renders of the class prompts
without the trigger plus ordinary prompts. (b) is measured on held-out class prompts ("square, a small square in
the center, orange background") and (b') on ordinary prompts.

Defaults = the best tuned settings (demo/NOTES.md has the tuning tables and the held-out numbers): **pivotal
tuning** -- the trigger trained as a 4-vector embedding (lr 5e-2) with a U-Net-only LoCon rank 8 (lr 5e-4), 800
steps, 16 regularisation images, LoRA weight 0.7. Held out they give (a) 0.85, (b) 0.00, (b') 0.00, (c) 0.85: the
vectors give the U-Net a signal only the trigger sends, so the bands follow "acme" and not "square". Without pivotal
tuning (``--pivotal 0 --lr 2e-3 --text-lr 1e-3``) the LoCon layers draw the bands for the class word alone
((b) 0.70). The embedding half is ``bench/brand_embedding.py`` (a brand colour; an embedding alone never draws
the bands).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from demo.brand_concept import (  # noqa: E402
    CLASS_WORD, TRIGGER, TRIGGER_PROMPTS, UNCHANGED_THRESHOLD, concept_present, concept_score, ordinary_scenes,
    scene_agreement, unchanged_score, write_concept_images,
)
from demo.scenes import NATIVE_SIZE  # noqa: E402

WORK = ROOT / "bench" / "_work"
REPORT = WORK / "brand-training.json"
ADAPTER_NAME = "acme_mug"
# An embedding's name is its file's stem and what prompts say; "acme" alone is a CLIP word, which the trainer refuses.
EMBEDDING_NAME = "acme-brand"
TARGETS = {"present_with_trigger": 0.7, "present_without_trigger": 0.2, "ordinary_unchanged": 0.8}
# Seed bases and ordinary-scene seeds: "tune" is what settings were chosen on, "final" is held out for the report.
EVAL_SETS = {"tune": {"seed": 100, "scenes": 2024}, "final": {"seed": 7000, "scenes": 31337}}


@dataclass(frozen=True)
class BenchSettings:
    adapter: str = "lora"  # "lora" or "embedding"
    # The captions' class word: a shape the bundled model knows whose silhouette is closest to the drawn mug (a
    # rounded rectangle), so the trigger carries the bands and the class word keeps its meaning (DreamBooth).
    class_word: str = "square"
    steps: int = 800
    rank: int = 8
    lr: float = 5e-4  # U-Net LoRA; embedding: A1111's 5e-3 is the usual start
    vectors: int = 4  # embedding only
    text_lr: float = 1e-3
    # Off: with pivotal tuning the trigger's vectors carry the prompt side, and a text-encoder LoRA would move
    # every prompt's encoding (the ordinary prompts of (c)) for nothing.
    train_text_encoder: bool = False
    conv: bool = True  # LoCon: the 3x3 convs too; a texture (the bands) is drawn there more than in attention
    weight: float = 0.7  # LoRA strength at render time (te and unet alike)
    seed: int = 0  # training seed (also the concept folder's)
    images: int = 16
    renders: int = 20  # renders per measurement: (a), (b) and (c) each
    render_steps: int = 20
    cfg: float = 6.0
    # DreamBooth prior preservation (regularisation images): this many base-model renders, half class prompts
    # ("square, a large square on the left, ..."), half ordinary demo prompts, join the training set with their
    # prompts as captions, so training also pulls those words towards what the base model drew. 0: off.
    prior: int = 16
    eval: str = "final"
    # Pivotal tuning: > 0 trains the trigger as an embedding of this many vectors with the LoRA (prompts then say
    # EMBEDDING_NAME and load both files); 0: the trigger is the tokenizer's own word.
    pivotal: int = 4
    pivotal_lr: float = 5e-2
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other whenever another process holds
    # a core, and a 128x128 model gives them little to share (measured: 400 LoRA steps in ~19 s with 1 thread or
    # 2 threads on an idle machine, ~0.5 s a step with 2 threads at load average 4).
    threads: int = 1


@dataclass
class TrainedAdapter:
    name: str
    path: Path
    sha256: str
    seconds: float
    steps: int
    final_loss: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    extra: dict = field(default_factory=dict)


def load() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_trigger(prompt: str, trigger: str = TRIGGER) -> str:
    """``prompt`` with the trigger word cut but the class word kept: "an acme mug" -> "a mug"."""
    text = prompt.replace(f"an {trigger} ", "a ").replace(f"{trigger} ", "")
    return text


def train_adapter(models, folder: Path, settings: BenchSettings, out_dir: Path) -> TrainedAdapter:
    """Train the adapter on ``folder`` and write its file to ``out_dir``; the models are left as they were."""
    from engine.training.image_set import load_image_set

    image_set = load_image_set(folder, trigger=TRIGGER, class_word=settings.class_word, min_side=NATIVE_SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.prior:
        image_set = with_prior(image_set, models, settings, out_dir / "prior")
    if settings.adapter == "embedding":
        return _train_embedding(models, image_set, settings, out_dir)
    if settings.adapter != "lora":
        raise ValueError(f"unknown adapter {settings.adapter!r}")
    from engine.training.lora_export import export_lora
    from engine.training.lora_trainer import LoraTrainingConfig, train_lora

    # alpha == rank (scale 1): with scale 0.5 the same change needs twice the lr, no other difference.
    config = LoraTrainingConfig(rank=settings.rank, alpha=float(settings.rank), steps=settings.steps, lr=settings.lr,
                                text_lr=settings.text_lr, train_text_encoder=settings.train_text_encoder,
                                conv=settings.conv, pivotal_vectors=settings.pivotal, pivotal_lr=settings.pivotal_lr,
                                resolution=NATIVE_SIZE, seed=settings.seed, save_every=max(settings.steps, 1))
    before = load()
    # A fresh state folder each run: a resumed run would report the wall time of nothing.
    with tempfile.TemporaryDirectory(prefix="brand-lora-state-") as state:
        result = train_lora(models, image_set, config, state_dir=state,
                            token=EMBEDDING_NAME if settings.pivotal else None)
    after = load()
    path = export_lora(out_dir / f"{ADAPTER_NAME}.safetensors", result, models, image_set, config,
                       output_name=ADAPTER_NAME)
    extra: dict = {"buckets": {f"{w}x{h}": n for (w, h), n in result.buckets.items()}}
    if settings.pivotal:
        from engine.training.lora_export import export_pivotal_embedding

        emb = export_pivotal_embedding(out_dir / f"{EMBEDDING_NAME}.safetensors", result, models, image_set, config,
                                       lora_name=path.name)
        extra["embedding"] = {"path": str(emb), "sha256": _sha256(emb)}
    tail = result.losses[-20:]
    return TrainedAdapter(ADAPTER_NAME, path, _sha256(path), result.seconds, result.steps,
                          float(np.mean(tail)) if tail else float("nan"), before, after, extra)


def class_prompts(n: int, seed: int, class_word: str = CLASS_WORD) -> list[str]:
    """``n`` prompts in the training captions' grammar with the trigger cut ("square, a large square on the left,
    pink background"): what the class word alone must still mean."""
    import random

    from demo.brand_concept import concept_image

    rng = random.Random(seed)
    return [without_trigger(concept_image(rng, class_word=class_word)[1]) for _ in range(n)]


def prior_prompts(n: int, seed: int, class_word: str = CLASS_WORD) -> list[str]:
    """Half class prompts (:func:`class_prompts`), half ordinary demo prompts; seeds and scenes differ from both
    evaluation sets."""
    classes = class_prompts((n + 1) // 2, seed + 4242, class_word)
    others = [s.caption for s in ordinary_scenes(n // 2, seed=seed + 99)]
    return [p for pair in zip(classes, others + [""]) for p in pair if p][:n]


def with_prior(image_set, models, settings: BenchSettings, folder: Path):
    """``image_set`` plus ``settings.prior`` base-model renders as regularisation images: written with their prompts
    as ``.txt`` captions to a subfolder of ``folder`` named by what made them (reused after), and read back as a
    user's ``--reg-images`` folder is."""
    from engine.pipeline import Pipeline
    from engine.training.image_set import load_regularisation_set, with_regularisation

    prompts = prior_prompts(settings.prior, settings.seed, settings.class_word)
    folder = folder / f"{settings.class_word}-n{settings.prior}-seed{settings.seed}-steps{settings.render_steps}"
    folder.mkdir(parents=True, exist_ok=True)
    # Named by prompt too: a cached render of another prompt must not be reused.
    paths = [folder / f"prior_{i:03d}_{hashlib.sha256(p.encode()).hexdigest()[:8]}.png" for i, p in enumerate(prompts)]
    todo = [i for i, path in enumerate(paths) if not path.is_file()]
    if todo:  # the base model, before any training: what the class word and the ordinary words meant to it
        requests = _requests([prompts[i] for i in todo], [90_000 + settings.seed * 1000 + i for i in todo],
                             settings, None)
        for i, r in zip(todo, Pipeline(models).generate(requests)):
            paths[i].with_suffix(".txt").write_text(prompts[i], encoding="utf-8")
            r.image.save(paths[i])
    reg = load_regularisation_set(folder, trigger=image_set.trigger, class_word=image_set.class_word,
                                  min_side=NATIVE_SIZE)
    return with_regularisation(image_set, reg)


def _train_embedding(models, image_set, settings: BenchSettings, out_dir: Path) -> TrainedAdapter:
    """Textual inversion: ``settings.vectors`` new vectors named :data:`EMBEDDING_NAME`, every model weight frozen."""
    from engine.training.embedding_export import export_embedding
    from engine.training.embedding_trainer import EmbeddingTrainingConfig, train_embedding

    config = EmbeddingTrainingConfig(vectors=settings.vectors, steps=settings.steps, lr=settings.lr,
                                     resolution=NATIVE_SIZE, seed=settings.seed, save_every=max(settings.steps, 1))
    before = load()
    with tempfile.TemporaryDirectory(prefix="brand-embedding-state-") as state:
        result = train_embedding(models, image_set, config, token=EMBEDDING_NAME, state_dir=state)
    after = load()
    path = export_embedding(out_dir / f"{EMBEDDING_NAME}.safetensors", result, models, image_set, config)
    tail = result.losses[-20:]
    return TrainedAdapter(EMBEDDING_NAME, path, _sha256(path), result.seconds, result.steps,
                          float(np.mean(tail)) if tail else float("nan"), before, after,
                          {"buckets": {f"{w}x{h}": n for (w, h), n in result.buckets.items()}})


def trigger_prompt(prompt: str, class_word: str) -> str:
    """One of :data:`TRIGGER_PROMPTS` ("acme mug ...") with ``class_word`` in place of the mug."""
    return prompt.replace(f"{TRIGGER} {CLASS_WORD}", f"{TRIGGER} {class_word}")


def say_trigger(prompt: str, settings: BenchSettings) -> str:
    """A trigger prompt as the adapter's user writes it: an embedding is called by its file name, so "acme" becomes
    :data:`EMBEDDING_NAME` (as the trainer rewrote the captions); a LoRA's trigger is the caption word itself."""
    if settings.adapter != "embedding" and not settings.pivotal:
        return prompt
    return re.sub(rf"(?<!\w){re.escape(TRIGGER)}(?!\w)", EMBEDDING_NAME, prompt)


def _requests(prompts: Sequence[str], seeds: Sequence[int], settings: BenchSettings, adapter: TrainedAdapter | None):
    from engine.adapters.refs import AdapterFile, LoraUse
    from engine.pipeline import GenerationRequest

    loras: tuple = ()
    embeddings: tuple = ()
    prefix = ""
    if adapter is not None and settings.adapter == "embedding":
        # Offered to every request: it only acts where a prompt says its name, which is what (b) and (c) check.
        embeddings = (AdapterFile(adapter.name, str(adapter.path), adapter.sha256),)
    elif adapter is not None:
        w = settings.weight
        loras = (LoraUse(AdapterFile(adapter.name, str(adapter.path), adapter.sha256), w, w),)
        if "embedding" in adapter.extra:  # pivotal tuning: the trigger's embedding goes with the LoRA
            emb = adapter.extra["embedding"]
            embeddings = (AdapterFile(EMBEDDING_NAME, emb["path"], emb["sha256"]),)
        prefix = f"<lora:{adapter.name}:{w:g}> "  # the tag must match the LoraUse (engine/adapters/infotext.py)
    return [GenerationRequest(prefix + p, seed=s, width=NATIVE_SIZE, height=NATIVE_SIZE, steps=settings.render_steps,
                              cfg_scale=settings.cfg, loras=loras, embeddings=embeddings)
            for p, s in zip(prompts, seeds)]


def measure(pipe, adapter: TrainedAdapter, settings: BenchSettings) -> dict:
    """Render (a), (b) and (c) and score them; every share is over the renders it names."""
    base_seed, scene_seed = EVAL_SETS[settings.eval]["seed"], EVAL_SETS[settings.eval]["scenes"]
    n = settings.renders
    # Each prompt in turn, a new seed per render: n renders over the 10 trigger prompts, said with the class word.
    trig = [trigger_prompt(TRIGGER_PROMPTS[i % len(TRIGGER_PROMPTS)], settings.class_word) for i in range(n)]
    seeds = [base_seed + i for i in range(n)]
    # (b): class prompts in the regularisation set's grammar, held-out scenes and seeds.
    classes = class_prompts(n, scene_seed + 1, settings.class_word)
    scenes = ordinary_scenes(n, seed=scene_seed)
    ordinary = [s.caption for s in scenes]
    o_seeds = [base_seed + 500 + i for i in range(n)]
    batches = {
        "trigger": _requests([say_trigger(p, settings) for p in trig], seeds, settings, adapter),
        "no_trigger": _requests(classes, [base_seed + 250 + i for i in range(n)], settings, adapter),
        "ordinary_adapted": _requests(ordinary, o_seeds, settings, adapter),
        "ordinary_base": _requests(ordinary, o_seeds, settings, None),
    }
    t0, before = time.perf_counter(), load()
    images = {k: [r.image for r in pipe.generate(v)] for k, v in batches.items()}
    seconds = time.perf_counter() - t0
    total = sum(len(v) for v in images.values())
    out_dir = adapter.path.parent / "renders"
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("trigger", "no_trigger"):  # a few to look at, not all
        for i, im in enumerate(images[kind][:4]):
            im.save(out_dir / f"{kind}-{i}.png")
    same = [unchanged_score(a, b) for a, b in zip(images["ordinary_adapted"], images["ordinary_base"])]
    agree = [scene_agreement(a, b, s) for a, b, s in zip(images["ordinary_adapted"], images["ordinary_base"], scenes)]

    def share(kind: str) -> float:
        return float(np.mean([concept_present(im) for im in images[kind]]))

    return {
        "present_with_trigger": share("trigger"),
        "present_without_trigger": share("no_trigger"),
        "present_ordinary_adapted": share("ordinary_adapted"),
        "present_ordinary_base": share("ordinary_base"),
        "ordinary_unchanged": float(np.mean([s >= UNCHANGED_THRESHOLD - 1e-9 for s in same])),
        "ordinary_scene_agreement": float(np.mean(agree)),
        "unchanged_score_median": float(np.median(same)),
        "concept_score_trigger_median": float(np.median([concept_score(im) for im in images["trigger"]])),
        "renders": {k: len(v) for k, v in images.items()},
        "render_seconds": round(seconds, 1),
        "seconds_per_render": round(seconds / max(total, 1), 2),
        "load_during_renders": [before, load()],
        "examples": {"trigger": [say_trigger(p, settings) for p in trig[:3]],
                     "no_trigger": classes[:3], "ordinary": ordinary[:3]},
    }


def run_bench(settings: BenchSettings, work: Path | None = None, *, model_path: Path | None = None) -> dict:
    """The whole bench: concept folder, training, export, renders, scores. Returns the report (a JSON object)."""
    import torch

    from engine.bundled import bundled_model_path
    from engine.loading import load_checkpoint
    from engine.pipeline import Pipeline

    torch.set_num_threads(settings.threads)
    work = WORK if work is None else work  # looked up at call time, so a caller (a test) may move it
    folder = work / "acme-mug"
    for old in folder.glob("*") if folder.is_dir() else ():
        old.unlink()  # another --images or --seed must not leave stale photos in the set
    write_concept_images(folder, settings.images, settings.seed, class_word=settings.class_word)
    models = load_checkpoint(model_path or bundled_model_path(), device="cpu")
    adapter = train_adapter(models, folder, settings, work / f"brand-{settings.adapter}")
    print(f"trained {adapter.steps} steps in {adapter.seconds:.0f} s, load average {load()}; rendering", flush=True)
    scores = measure(Pipeline(models), adapter, settings)
    met = {k: (scores[k] <= t if k == "present_without_trigger" else scores[k] >= t) for k, t in TARGETS.items()}
    return {
        "settings": asdict(settings),
        "training": {"seconds": round(adapter.seconds, 1), "steps": adapter.steps,
                     "steps_per_second": round(adapter.steps / adapter.seconds, 3) if adapter.seconds else None,
                     "final_loss_mean20": round(adapter.final_loss, 5), "load_before": adapter.load_before,
                     "load_after": adapter.load_after, "file": str(adapter.path), "sha256": adapter.sha256,
                     **adapter.extra},
        "scores": scores,
        "targets": TARGETS,
        "met": met,
        "torch_threads": settings.threads,
    }


def print_table(report: dict) -> None:
    s, t, m = report["settings"], report["training"], report["scores"]
    if s["adapter"] == "embedding":
        what = f"vectors {s['vectors']} (init {s['class_word']!r})"
    else:
        te = f"on (lr {s['text_lr']:g})" if s["train_text_encoder"] else "off"
        what = (f"rank {s['rank']}{' conv' if s['conv'] else ''}  text-encoder {te}  weight {s['weight']:g}  "
                f"prior {s['prior']}")
    print(f"\nadapter {s['adapter']}  class word {s['class_word']!r}  steps {s['steps']}  lr {s['lr']:g}  {what}  "
          f"eval {s['eval']}")
    print(f"training: {t['seconds']:.0f} s wall, {t['steps_per_second']} steps/s, loss(last 20) "
          f"{t['final_loss_mean20']}, load average {t['load_before']} -> {t['load_after']}")
    print(f"renders: {sum(m['renders'].values())} in {m['render_seconds']} s ({m['seconds_per_render']} s each), "
          f"load average {m['load_during_renders'][0]} -> {m['load_during_renders'][1]}")
    rows = [
        ("(a) concept present, trigger prompts", m["present_with_trigger"], ">= 0.7"),
        ("(b) concept present, class prompts ('a square ...')", m["present_without_trigger"], "<= 0.2"),
        ("(b') concept present, ordinary prompts + adapter", m["present_ordinary_adapted"], "(low)"),
        ("    concept present, ordinary prompts, base", m["present_ordinary_base"], "(0)"),
        ("(c) ordinary prompts unchanged (>= 0.95 pixels)", m["ordinary_unchanged"], ">= 0.8"),
        ("(c) ordinary scene agreement (mean)", m["ordinary_scene_agreement"], ""),
    ]
    for name, value, target in rows:
        print(f"  {name:<50} {value:6.3f}  {target}")
    print("targets met:", report["met"], " load average now", load())


def _parse(argv: Sequence[str] | None = None) -> tuple[BenchSettings, str, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = BenchSettings()
    p.add_argument("--adapter", choices=("lora", "embedding"), default=d.adapter)
    p.add_argument("--class-word", default=d.class_word)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--vectors", type=int, default=d.vectors)
    p.add_argument("--text-lr", type=float, default=d.text_lr)
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=d.train_text_encoder,
                   help="also train the text encoder's LoRA")
    p.add_argument("--conv", action=argparse.BooleanOptionalAction, default=d.conv,
                   help="LoCon: train the 3x3 convolutions too")
    p.add_argument("--weight", type=float, default=d.weight)
    p.add_argument("--pivotal", type=int, default=d.pivotal,
                   help="pivotal tuning: train the trigger as an embedding of N vectors with the LoRA (0: off)")
    p.add_argument("--pivotal-lr", type=float, default=d.pivotal_lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--renders", type=int, default=d.renders)
    p.add_argument("--prior", type=int, default=d.prior, help="prior-preservation images (0: off)")
    p.add_argument("--eval", choices=tuple(EVAL_SETS), default=d.eval)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--scale", choices=("full", "tiny"), default="full",
                   help="tiny: 2 steps, 2 renders, 4 render steps (a smoke run of the code path)")
    p.add_argument("--report", default=None, help=f"default {REPORT} ({WORK}/tiny/... with --scale tiny)")
    p.add_argument("--work", default=None, help="folder for the images, the adapter and sample renders")
    a = p.parse_args(argv)
    s = BenchSettings(adapter=a.adapter, class_word=a.class_word, steps=a.steps, rank=a.rank, lr=a.lr,
                      text_lr=a.text_lr,
                      train_text_encoder=a.text_encoder, weight=a.weight, seed=a.seed, renders=a.renders,
                      eval=a.eval, threads=a.threads, prior=a.prior, vectors=a.vectors, conv=a.conv,
                      pivotal=a.pivotal, pivotal_lr=a.pivotal_lr)
    if a.scale == "tiny":
        s = BenchSettings(**{**asdict(s), "steps": 2, "renders": 2, "render_steps": 4, "images": 4})
    # A smoke run must not overwrite the measured adapter and report.
    work = Path(a.work) if a.work else WORK / "tiny" if a.scale == "tiny" else WORK
    return s, a.report or str(work / REPORT.name), work


def main(argv: Sequence[str] | None = None) -> None:
    settings, report_path, work = _parse(argv)
    print("load average at start", load())
    report = run_bench(settings, work)
    print_table(report)
    out = Path(report_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"report: {out}")


if __name__ == "__main__":
    main()

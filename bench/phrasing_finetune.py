"""Issue 22's second proof: fine-tune the bundled demo model on widened captions with the project's own trainer.

Renders ``--images`` procedural scenes (demo/scenes.py) captioned 60 % with demo/phrasings.py's training templates and
40 % with the original grammar, and fine-tunes the shipped model with ``train_dreambooth`` (text encoder on, prior
weight 0: a plain full fine-tune), writing ``bench/_work/phrasing/<name>.safetensors`` in float16 with the shipped
file's metadata plus an ``adforge.phrasing_finetune`` note. Measure before and after with bench/phrasing_adherence.py
(held-out phrasings) and bench/demo_adherence.py. The defaults are the run recorded in demo/NOTES.md::

    .venv/bin/python bench/phrasing_finetune.py
    .venv/bin/python bench/phrasing_adherence.py --model bench/_work/phrasing/tuned.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from demo.phrasings import training_captions  # noqa: E402
from demo.scenes import render  # noqa: E402
from engine.bundled import bundled_model_path  # noqa: E402
from engine.loading import load_checkpoint  # noqa: E402
from engine.training.dreambooth_trainer import DreamBoothConfig, export_dreambooth, train_dreambooth  # noqa: E402
from engine.training.image_set import ImageItem, ImageSet  # noqa: E402

WORK = ROOT / "bench" / "_work" / "phrasing"


def write_folder(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == n:
        return
    for i, (scene, text) in enumerate(training_captions(seed, n)):
        render(scene).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(text + "\n")


def image_set(folder: Path) -> ImageSet:
    """The folder as an ImageSet: captions from the sidecars. Built directly (not load_image_set), as these captions
    share no trigger word (the old grammar's "backdrop" captions don't say "background")."""
    digest = hashlib.sha256()
    items = []
    for path in sorted(folder.glob("*.png")):
        caption = " ".join(path.with_suffix(".txt").read_text().split())
        items.append(ImageItem(path, caption, 128, 128))
        for part in (path.name.encode(), path.read_bytes(), caption.encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return ImageSet(folder, "phrasings", "scene", items, digest.hexdigest())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--text-lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--name", default="tuned")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    folder = WORK / f"images-{args.images}-{args.seed}"
    write_folder(folder, args.images, args.seed)
    print(f"folder {folder.name}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}", flush=True)
    models = load_checkpoint(bundled_model_path(), device="cpu")
    config = DreamBoothConfig(steps=args.steps, lr=args.lr, text_lr=args.text_lr, train_text_encoder=True,
                              batch_size=args.batch, prior_loss_weight=0.0, num_class_images=0, seed=args.seed,
                              save_every=50, lr_scheduler="cosine", warmup_steps=20)
    t1 = time.perf_counter()

    def on_step(step: int, total: int, loss: float) -> None:
        if step % 25 == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f} {time.perf_counter() - t1:.0f} s load {os.getloadavg()}", flush=True)

    result = train_dreambooth(models, image_set(folder), config, class_dir=WORK / "class",
                              state_dir=WORK / f"state-{args.name}", on_step=on_step)
    print(f"trained {args.steps} steps in {result.seconds:.0f} s (incl. latent caching {time.perf_counter() - t1:.0f} s "
          f"wall), load {os.getloadavg()}", flush=True)
    with safe_open(str(bundled_model_path()), framework="pt") as f:
        base = dict(f.metadata() or {})
    keep = {k: v for k, v in base.items() if k.startswith(("adforge.", "modelspec."))}
    note = {"base_sha256": models.checkpoint.sha256, "images": args.images, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "text_lr": args.text_lr, "seed": args.seed, "trainer": "train_dreambooth, prior 0, text encoder",
            "captions": "demo/phrasings.py TRAIN_TEMPLATES 60 % + original grammar 40 %"}
    out = export_dreambooth(WORK / f"{args.name}.safetensors", result, models,
                            metadata={**keep, "adforge.phrasing_finetune": json.dumps(note, sort_keys=True)})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()

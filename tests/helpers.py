"""Helpers shared by the test packages: plain functions and constants, imported as ``from tests.helpers import ...``
(fixtures live in ``tests/conftest.py``; the review tests' database world in ``tests/review/world.py``)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from engine.pipeline import GenerationRequest
    from engine.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent  # the repository (prefect.yaml, templates/, examples/, models/)
EXAMPLE_BRIEFS = ROOT / "examples" / "briefs"
PREFECT = Path(sys.executable).parent / "prefect"  # this environment's Prefect CLI
POSTGRES_URL = os.environ.get("ADFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# ------------------------------------------------------------------------------------------------ storage


def alembic_step(db: Any, action: Callable[..., None], revision: str) -> None:
    """Run an Alembic command (``alembic.command.upgrade`` / ``downgrade``) to ``revision`` on ``db`` the way
    :meth:`storage.database.Database.upgrade` does (its connection handed to env.py)."""
    from alembic.config import Config

    from storage.database import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", os.fspath(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        action(cfg, revision)


# ------------------------------------------------------------------------------------------------ engine


def cap_unet_latents(cap: int, unet: torch.nn.Module | None = None) -> RemovableHandle:
    """A device that holds only ``cap`` latents per U-Net call: the U-Net raises a real ``torch.OutOfMemoryError``
    for a bigger call, at the point where such a device would fail (before the call's activations exist). On
    ``unet``, or on every U-Net of this process (a render worker's ``worker_init``, before it loads a model)."""
    from engine.unet import UNetModel

    def check(module: torch.nn.Module, args: tuple) -> None:
        if not isinstance(module, UNetModel):
            return
        x = args[0]
        if x.shape[0] > cap:
            need = x.shape[0] * x[0].numel() * x.element_size()
            raise torch.OutOfMemoryError(
                f"latent cap {cap}: out of memory for a U-Net call on {x.shape[0]} latents "
                f"({need} bytes of input on {x.device}); this device holds {cap}")

    if unet is not None:
        return unet.register_forward_pre_hook(check)
    return torch.nn.modules.module.register_module_forward_pre_hook(check)


def make_req(*, seed: int, **defaults: Any) -> Callable[..., GenerationRequest]:
    """A test module's ``req(seed=<seed>, **kw)``: a GenerationRequest from ``defaults`` (4 steps at CFG 5 unless
    they say otherwise), any field overridden by ``kw``."""
    from engine.pipeline import GenerationRequest

    base = {"steps": 4, "cfg_scale": 5.0, **defaults}

    def req(seed: int = seed, **kw: Any) -> GenerationRequest:
        return GenerationRequest(**{**base, "seed": seed, **kw})

    return req


def arr(image: Image.Image) -> np.ndarray:
    """An image's pixels as signed integers, so that differences between two images do not wrap around."""
    return np.asarray(image, dtype=np.int16)


def analytic_vae() -> AutoencoderKL:
    """The demo's analytic VAE start (demo/vae_init.py) on a 4-level, one-block-per-level VAE, in eval mode."""
    from demo.vae_init import init_block_average_vae
    from engine.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(ch=128, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    init_block_average_vae(vae, seed=0)
    return vae.eval()


# ------------------------------------------------------------------------------------------------ files


def write_text(path: Path, text: str) -> Path:
    """``text`` into ``path`` (UTF-8), making its folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_brief(path: Path, rows: Iterable[str | Mapping[str, Any]], header: Sequence[str]) -> Path:
    """A CSV brief: the ``header`` line, then one line per row, given either as a line of CSV text (written as is)
    or as a mapping of column -> value (columns it leaves out stay empty; values quoted as CSV needs)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        if isinstance(row, str):
            out.write(row + "\n")
        else:
            writer.writerow([row.get(k, "") for k in header])
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ subprocesses


def run_prefect(*args: str, env: Mapping[str, str]) -> str:
    """``prefect <args>`` (this environment's CLI) in the repository root with exactly ``env``; its stdout. A failure
    fails the test, showing both streams."""
    proc = subprocess.run([str(PREFECT), *args], cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def batched_device_with_latent_cap(cap: int) -> None:
    """A render worker's ``worker_init``: this process's pipelines batch images per network call as on a GPU, on
    a device that holds ``cap`` latents per U-Net call."""
    from engine.pipeline import Pipeline

    Pipeline.BATCH_INVARIANT_DEVICES = frozenset()
    cap_unet_latents(cap)


def templates_with(tmp_path: Path, channels: dict[str, tuple[int, int, str | None]]) -> Path:
    """A copy of the project's templates with extra channels: name -> (width, height, upscale chain or None)."""
    text = ""
    for name, (w, h, chain) in channels.items():
        text += f"  {name}:\n    width: {w}\n    height: {h}\n    format: jpeg\n    max_kb: 8192\n    template: vertical\n"
        if chain is not None:
            text += f"    upscale: \"{chain}\"\n"
    return templates_with_channels(tmp_path, text)


def templates_with_channels(tmp_path: Path, channels_yaml: str) -> Path:
    """A copy of the project's templates in ``tmp_path / "templates"`` with ``channels_yaml`` (entries indented under
    ``channels:``) added to channels.yaml."""
    import shutil

    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    with open(templates / "channels.yaml", "a", encoding="utf-8") as f:
        f.write(channels_yaml)
    return templates


def high_frequency(data: bytes) -> float:
    """Mean absolute difference between a picture and its 3x3 box blur: what a blur removes."""
    with Image.open(io.BytesIO(data)) as im:
        grey = im.convert("L")
        a = np.asarray(grey, dtype=np.float32)
        b = np.asarray(grey.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    return float(np.abs(a - b)[2:-2, 2:-2].mean())

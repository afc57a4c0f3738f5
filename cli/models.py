"""``adforge models``: inspect model files, write random test checkpoints and upscalers, register licences, list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cli.errors import fail
from cli.options import ConfigOpt, DbOpt, load_settings

__all__ = ["app", "models_add", "models_init_random", "models_init_random_upscaler", "models_inspect", "models_list"]

app = typer.Typer(no_args_is_help=True, help="Model files: inspect, make random test checkpoints.")


@app.command("init-random")
def models_init_random(
    path: Annotated[Path, typer.Argument(help="Where to write the .safetensors file.")],
    family: Annotated[str, typer.Option(help="sd1, sd2 (eps, 512), sd2-v (v-prediction, 768) or sdxl (base).")] = "sd1",
    preset: Annotated[str, typer.Option(
        help="tiny (a few MB, instant) or full (the real shapes: SD 1.5 ~4.3 GB, SD 2.1 ~5.2 GB, SDXL base ~14 GB in "
             "float32; sd15 is SD 1.x's full).")] = "tiny",
    seed: Annotated[int, typer.Option()] = 0,
    inpaint: Annotated[bool, typer.Option(help="9-channel inpainting U-Net (sd1, sd2, sdxl).")] = False,
    dtype: Annotated[str, typer.Option(help="float32, float16 (half the size, as most downloads) or bfloat16.")] = "float32",
    native_size: Annotated[
        int | None, typer.Option(min=8, help="Resolution recorded as the model's native size (default: 128 tiny, the "
                                             "family's for full: 512 sd1/sd2, 768 sd2-v, 1024 sdxl).")
    ] = None,
) -> None:
    """Write a random-weight checkpoint of a model family in the real single-file layout.

    It renders noise by design: use it to smoke-test a machine, the loader and the pipeline, or to benchmark
    at real shapes, without downloading anything."""
    import torch

    from engine.random_checkpoint import FAMILY_NAMES, random_spec, write_random

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise typer.BadParameter(f"unknown dtype {dtype!r}: {', '.join(dtypes)}", param_hint="--dtype")
    if family not in FAMILY_NAMES:
        raise typer.BadParameter(f"unknown family {family!r}: {', '.join(FAMILY_NAMES)}", param_hint="--family")
    try:
        spec = random_spec(family, preset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from None
    if inpaint and family not in ("sd1", "sd2", "sdxl"):
        raise typer.BadParameter(f"no inpainting variant of {family}: sd1, sd2 and sdxl only", param_hint="--inpaint")
    # Random numbers made by our own code: we can license them, so runs may use the file for any purpose.
    size = native_size or spec.native_size
    write_random(path, family, preset, seed=seed, inpaint=inpaint, dtype=dtypes[dtype],
                 metadata={"modelspec.title": path.stem, "modelspec.license": "Apache-2.0", "adforge.native_size": str(size)})
    typer.echo(str(path))


@app.command("init-random-upscaler")
def models_init_random_upscaler(
    path: Annotated[Path, typer.Argument(help="Where to write it: .safetensors or .pth.")],
    arch: Annotated[str, typer.Option(help="esrgan (RRDBNet, as RealESRGAN_x4plus) or compact (Real-ESRGAN Compact).")] = "esrgan",
    scale: Annotated[int, typer.Option(help="2 or 4.")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a small random-weight super-resolution file in a real layout (spandrel loads it like a downloaded one).

    It upscales into noise by design: use it to try upscale chains, tiling and licences without downloading
    anything. The .safetensors file declares Apache-2.0 (our own random numbers); a .pth carries no metadata."""
    from engine.upscale.random_models import random_compact, random_esrgan, write_upscaler

    if scale not in (2, 4):
        raise typer.BadParameter("2 or 4", param_hint="--scale")
    nets = {"esrgan": lambda: random_esrgan(num_filters=16, num_blocks=1, scale=scale, seed=seed),
            "compact": lambda: random_compact(num_feat=16, num_conv=4, scale=scale, seed=seed)}
    if arch not in nets:
        raise typer.BadParameter("esrgan or compact", param_hint="--arch")
    safetensors = path.suffix.lower() in (".safetensors", ".sft")
    metadata = {"modelspec.title": path.stem, "modelspec.license": "Apache-2.0"} if safetensors else None
    try:
        write_upscaler(nets[arch](), path, metadata)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATH") from None
    typer.echo(str(path))


@app.command("inspect")
def models_inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint, upscaler, LoRA or embedding file, or a diffusers folder.")],
    allow_pickle: Annotated[bool, typer.Option(help="Allow .ckpt pickles (weights-only unpickling).")] = False,
    db: Annotated[str | None, typer.Option("--db", help="Database whose training record of the file to show (env ADFORGE_DB_URL); never created.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Family, architecture read from the tensor shapes, and hashes of a checkpoint (without loading it), of an
    upscaler (its architecture and scale, as spandrel reads them), of a LoRA (format, family, ranks, alphas, modules
    touched, training metadata) or of a textual-inversion embedding (vectors, width, family)."""
    from engine.checkpoint import CheckpointError, a1111_short_hash, file_sha256, open_state_dict

    if path.is_dir():
        _inspect_folder(path, allow_pickle)
        return
    if _inspect_adapter(path):
        if (record := _registered_training(path, db, config)) is not None:
            typer.echo(f"trained:     {training_summary(record)}")
        return
    from engine.families import detect_family
    from engine.upscale.chain import MODEL_SUFFIXES
    from engine.upscale.networks import UpscalerError, inspect_upscaler, read_upscaler_state_dict

    try:
        sd = open_state_dict(path, allow_pickle)
        family = detect_family(sd)
    except CheckpointError as exc:
        if path.suffix.lower() in MODEL_SUFFIXES and exc.key is None:
            try:
                up = inspect_upscaler(path)
            except UpscalerError:
                pass
            else:
                typer.echo(f"file:        {path}")
                typer.echo(f"upscaler:    {up.arch}, {up.scale}x ({up.purpose})")
                typer.echo(f"tensors:     {len(read_upscaler_state_dict(path)[0])}")
                typer.echo(f"sha256:      {up.sha256}")
                typer.echo(f"model hash:  {up.short_hash}")
                return
        raise fail(exc, 2) from None
    sha = file_sha256(path)
    typer.echo(f"file:        {path}")
    typer.echo(f"family:      {family.name}" + ("" if family.supported else f" (unsupported: {family.reason})"))
    typer.echo(f"tensors:     {len(sd)}")
    typer.echo(f"sha256:      {sha}")
    typer.echo(f"model hash:  {a1111_short_hash(sha)}")


def _inspect_folder(path: Path, allow_pickle: bool) -> None:
    """A diffusers folder as the registry sees it: family, native size, prediction, the model card's licence, the
    folder hash."""
    from engine.checkpoint import CheckpointError
    from engine.diffusers_folder import open_folder
    from engine.families import detect_family
    from flows.model_registry import describe_model

    try:
        sd = open_folder(path, allow_pickle=allow_pickle)
        family = detect_family(sd)
        info = describe_model(path, allow_pickle=allow_pickle)
    except CheckpointError as exc:
        raise fail(exc, 2) from None
    typer.echo(f"folder:      {path}")
    typer.echo(f"family:      {family.name}" + ("" if family.supported else f" (unsupported: {family.reason})"))
    typer.echo(f"native size: {info.native_size}")
    typer.echo(f"prediction:  {sd.metadata.get('modelspec.prediction_type', 'epsilon')}")
    typer.echo(f"licence:     {info.license or 'unknown (no license: in README.md)'}")
    typer.echo(f"tensors:     {len(sd)} in {len(sd.files)} files")
    typer.echo(f"sha256:      {info.sha256}")
    typer.echo(f"model hash:  {info.short_hash}")


def _inspect_adapter(path: Path) -> bool:
    """Print what a LoRA or embedding file is; False if it is neither."""
    from engine.adapters.detect import inspect_adapter
    from engine.adapters.lora_file import LoraInfo
    from engine.adapters.refs import AdapterError
    from engine.checkpoint import a1111_short_hash, file_sha256

    if not path.is_file():
        return False
    try:
        info = inspect_adapter(path)
    except AdapterError as exc:
        raise fail(exc, 2) from None
    if info is None:
        return False
    sha = file_sha256(path)
    typer.echo(f"file:        {path}")
    if isinstance(info, LoraInfo):
        typer.echo(f"LoRA:        {info.format} for {info.family_label}")
        typer.echo(f"rank:        {', '.join(map(str, info.ranks)) or '-'}")
        typer.echo(f"alpha:       {', '.join(f'{a:g}' for a in info.alphas) or 'none (scale 1)'}")
        typer.echo(f"modules:     {info.unet_modules} U-Net, {info.text_encoder_modules} text encoder")
        typer.echo(f"sha256:      {sha}")
        typer.echo(f"lora hash:   {sha[:12]}  (use: <lora:{path.stem}:1>)")
        for key, value in info.metadata.items():
            typer.echo(f"{key + ':':<12} {value}")
        return True
    widths = ", ".join(f"{part or 'width'} {w}" for part, w in info.parts.items())
    typer.echo(f"embedding:   {info.format}, {info.vectors} vector(s), {widths}" + (f" ({info.family})" if info.family else ""))
    if info.step is not None or info.trained_name:
        typer.echo(f"trained:     {info.trained_name or '?'}, {info.step if info.step is not None else '?'} steps")
    typer.echo(f"sha256:      {sha}")
    typer.echo(f"ti hash:     {sha[:12]}  (use: write '{path.stem}' in a prompt)")
    typer.echo(f"model hash:  {a1111_short_hash(sha)}")
    return True


@app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="Model file: checkpoint, upscaler, LoRA or embedding; or a diffusers folder.")],
    license_id: Annotated[str, typer.Option("--license", help="Licence id, e.g. creativeml-openrail-m, cc-by-nc-sa-4.0.")],
    commercial: Annotated[str | None, typer.Option(help="yes / no: may assets be used commercially? Default: known for common licences.")] = None,
    name: Annotated[str | None, typer.Option(help="Display name (default: file or folder name).")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Register a model file (or diffusers folder) and its licence (required before commercial rows may use an unlabelled model)."""
    settings = load_settings(config, db_url=db)
    from engine.checkpoint import CheckpointError
    from flows.licence_policy import LicenseError
    from flows.model_registry import register_model
    from storage.database import open_database

    flag: bool | None = None
    if commercial is not None:
        if commercial.lower() not in ("yes", "no", "true", "false"):
            raise typer.BadParameter("expected yes or no", param_hint="--commercial")
        flag = commercial.lower() in ("yes", "true")
    try:
        info = register_model(open_database(settings.db_url), path, license_id, flag, name=name)
    except (LicenseError, CheckpointError) as exc:
        raise fail(exc, 2) from None
    typer.echo(f"registered {info.kind} {info.name} ({info.short_hash}, {info.family}): licence {info.license}, "
               f"commercial use {'allowed' if info.commercial_use else 'not allowed'}")


@app.command("list")
def models_list(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Registered and discovered models with their licences."""
    settings = load_settings(config, db_url=db)
    from sqlalchemy import select

    from storage.database import open_database
    from storage.schema import ModelRecord

    out = Console(highlight=False)
    with open_database(settings.db_url).session() as s:
        for m in s.scalars(select(ModelRecord).order_by(ModelRecord.id)):
            commercial = {True: "allowed", False: "not allowed", None: "unknown"}[m.commercial_use]
            out.print(f"{m.id}  {escape(m.name)} {escape(f'[{m.kind}]')} ({m.short_hash}, {m.family})  licence {m.license or 'unknown'} "
                      f"({m.license_source}), commercial use {commercial}  {escape(m.path)}", soft_wrap=True)
            if m.training:
                out.print(f"    trained: {escape(training_summary(m.training))}", soft_wrap=True)


def training_summary(record_json: str) -> str:
    """One line of a ``models.training`` record: what adforge trained the file on, from which base, how long."""
    import json

    try:
        r = json.loads(record_json)
    except ValueError:
        return "(unreadable training record)"
    base = r.get("base_model") or {}
    settings = r.get("settings") or {}
    shape = f", rank {settings['rank']}" if "rank" in settings else ""
    pivotal = r.get("pivotal") or {}
    # A pivotal-tuned LoRA and its embedding share the record: say which word prompts use and that both are needed.
    pair = f", pivotal: prompts say '{pivotal['token']}' with both files" if pivotal.get("token") else ""
    return (f"{r.get('trainer', '?')} on {r.get('images', '?')} images (set {str(r.get('image_set_sha256'))[:12]}), "
            f"trigger '{r.get('trigger')}' / class '{r.get('class_word')}', base {base.get('name')} "
            f"({str(base.get('sha256'))[:10]}), {r.get('steps')} steps{shape}{pair}, {r.get('seconds', 0):.0f} s, "
            f"finished {r.get('finished_at', '?')}")


def _registered_training(path: Path, db: str | None, config: Path | None) -> str | None:
    """The training record of the file's row in an existing database (never creates one), or None."""
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from engine.checkpoint import file_sha256
    from storage.database import open_database
    from storage.schema import ModelRecord

    settings = load_settings(config, db_url=db)
    try:
        url = make_url(settings.db_url)
        if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
            return None
        database = open_database(settings.db_url, upgrade=False)
        try:
            with database.session() as s:
                return s.scalar(select(ModelRecord.training).where(ModelRecord.sha256 == file_sha256(path)))
        finally:
            database.dispose()
    except Exception:  # unreachable, not our schema, an older one without the column: the file speaks alone
        return None

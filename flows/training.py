"""Brand training: a folder of product photos -> a LoRA, a textual-inversion embedding or a DreamBooth checkpoint of
a base model, registered with its training record and the base model's licence.

One code path: :func:`run_training` is what ``adforge train lora|embedding|dreambooth`` calls directly (no Prefect server for a local
run, as ``adforge generate``) and what the :func:`train_adapter` flow calls on a GPU worker of the pool (the
``brand-training`` deployment in prefect.yaml). The order of work is fixed so that nothing expensive happens on bad
input:

0. the settings and what the kind itself checks cheaply (an embedding's name and file name) are checked;
1. the base model is *described* (hash, family, native size, licence; no weights loaded) and the licence of the
   output decided: it is the base's (registered row, else what the file declares). ``license`` may only keep or
   narrow it; one that would allow commercial use of a base whose commercial use is forbidden or unknown is refused
   (a LoRA, an embedding or a fine-tune is a derivative of its base: OpenRAIL-M passes its restrictions on, a CC BY-NC base stays NC);
2. the image folder is checked, every problem named by file (:class:`ImageSetError`);
3. an existing output that is exactly this training (same fingerprint in its metadata, or for a ``.pt`` embedding,
   which has no metadata, in the state folder's ``output.json``) is kept: nothing is trained
   again, it is only (re-)registered. Another file at ``out`` is refused, never overwritten;
4. the model is loaded and the trainer runs, resuming from ``state_dir`` (so a killed run, or a Prefect retry of
   the flow, continues instead of starting over), rendering samples every ``sample_every`` steps;
5. the file is written atomically (the exporter renames a finished ``.part`` file) and registered.

A trainer kind is one row of :data:`flows.training_kinds.TRAINERS`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from engine.training.image_set import ImageSet, load_image_set, load_regularisation_set, with_regularisation
from flows.licence_policy import KNOWN_LICENSES, LicenseError, commercial_use_of, normalize_license
from flows.model_registry import ModelInfo, describe_model, register_trained
from flows.training_kinds import TRAINERS, Trainer, embedding_token, pivotal_embedding_path, pivotal_token

__all__ = ["TRAINERS", "TrainingJob", "TrainingOutcome", "run_training", "train_adapter"]

StepFn = Callable[[int, int, float], None]  # step (from 1), total steps, loss
LogFn = Callable[[str], None]
SAMPLE_NEGATIVE = ""
OUTPUT_FILE = "output.json"  # in the state folder: the exported file's sha256, identity and training record


@dataclass(frozen=True)
class TrainingJob:
    kind: str
    images: str
    trigger: str
    class_word: str
    out: str
    model: str | None = None  # None: the configured model, else the bundled one
    settings: dict[str, Any] = field(default_factory=dict)  # the trainer config's fields (rank, steps, lr, ...)
    state_dir: str | None = None  # None: OUT's folder/.train-<stem>
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()  # empty: "<trigger> <class word>" and "<class word>"
    sample_steps: int = 20
    device: str = "auto"
    dtype: str = "auto"
    license: str | None = None  # None: the base model's
    register: bool = True
    db_url: str | None = None  # None: settings (ADFORGE_DB_URL, adforge.toml, default)
    config_file: str | None = None
    # embedding: the name prompts say (None: OUT's stem); a pivotal-tuned LoRA: its trigger embedding's name (None:
    # flows.training_kinds.pivotal_token); DreamBooth ignores it
    token: str | None = None
    reg_images: str | None = None  # lora: a folder of regularisation images (kohya's reg_data_dir); None: none

    @property
    def state_path(self) -> Path:
        out = Path(self.out)
        return Path(self.state_dir) if self.state_dir else out.parent / f".train-{out.stem}"

    def prompts(self) -> list[str]:
        # With and without the trigger: the pair shows whether the product appears only when asked for. An
        # embedding is called by its name, not by the trigger (its captions had the trigger replaced by the name).
        word = embedding_token(self) if self.kind == "embedding" else self.trigger
        if self.kind == "lora" and self.settings.get("pivotal_vectors"):
            word = pivotal_token(self)
        return list(self.sample_prompts) or [f"{word} {self.class_word}", self.class_word]


@dataclass
class TrainingOutcome:
    out: str
    sha256: str
    kind: str
    steps: int
    resumed_from: int  # 0: a fresh run; == steps: nothing left to train
    seconds: float  # training time over all runs
    wall_seconds: float  # this call
    licence: str | None
    commercial_use: bool | None
    record: dict[str, Any]  # the training record stored in models.training
    skipped: bool = False  # the output already was this training: nothing done
    registered: str | None = None  # the registration line, None when not registered
    samples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Licence:
    id: str | None
    commercial_use: bool | None
    source: str  # "inherited" | "override"
    warning: str | None = None


def decide_licence(base: ModelInfo, override: str | None) -> Licence:
    """The output's licence: the base's, or a stricter one the user names; never one that claims more."""
    if not override:
        return Licence(base.license, base.commercial_use, "inherited")
    lic = normalize_license(override)
    commercial = commercial_use_of(lic)
    if commercial is None and lic not in KNOWN_LICENSES:
        # An id we cannot judge: treat it as claiming nothing, so the policy refuses commercial rows until registered.
        commercial = False if base.commercial_use is False else None
    if commercial and base.commercial_use is not True:
        why = "forbids commercial use" if base.commercial_use is False else "has no licence on record that allows commercial use"
        raise LicenseError(
            f"--license {override} allows commercial use, but the base model '{base.name}' ({base.short_hash}) {why} "
            f"(licence {base.license or 'unknown'}): a {base.noun} trained on it is a derivative and cannot be "
            "licensed more freely than its base; register the base model's licence first if it does allow it")
    return Licence(lic, commercial, "override")


def _load_trainer(kind: str) -> Trainer:
    if kind not in TRAINERS:
        raise ValueError(f"unknown trainer kind {kind!r}: {', '.join(TRAINERS)}")
    return TRAINERS[kind]()


def _make_config(trainer: Trainer, job: TrainingJob):
    known = {f.name for f in fields(trainer.config_class)}
    settings = dict(job.settings)
    settings["sample_every"] = job.sample_every
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {trainer.name} training settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    config = trainer.config_class(**settings)
    config.check()
    trainer.check(job, config)
    return config


def _file_fingerprint(path: Path, state: Path) -> str | None:
    """The training fingerprint an exported file carries in its metadata, else the one the state folder's
    ``output.json`` gives for exactly these bytes (an A1111 ``.pt`` has no metadata); None: not one of ours."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            found = (f.metadata() or {}).get("adforge.training_fingerprint")
        if found:
            return found
    except Exception:  # not safetensors, truncated: the state folder may still know it
        pass
    written = _output_record(path, state)
    return written.get("identity") if written else None


def _output_record(path: Path, state: Path) -> dict[str, Any] | None:
    """What the last export wrote into ``state/output.json``, if it is about these very bytes."""
    from engine.checkpoint import file_sha256

    try:
        written = json.loads((state / OUTPUT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return written if written.get("sha256") == file_sha256(path) else None


def _open_db(job: TrainingJob):
    from flows.settings import load_settings
    from storage.database import open_database

    settings = load_settings({"db_url": job.db_url}, config=job.config_file)
    return open_database(settings.db_url)


def _base_path(job: TrainingJob) -> Path:
    from flows.planning import default_model_path
    from flows.settings import load_settings

    if job.model:
        return Path(job.model)
    return default_model_path(load_settings({"db_url": job.db_url}, config=job.config_file))


def training_record(job: TrainingJob, trainer: Trainer, config, image_set: ImageSet, base: ModelInfo, result,
                    resolution: int, licence: Licence) -> dict[str, Any]:
    """What ``models.training`` stores: enough to say what the file was trained on, from what, and how."""
    def when(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")

    record = {
        "trainer": trainer.name,
        "settings": {**asdict(config), "resolution": resolution},
        "image_set_sha256": image_set.sha256,
        "images": len(image_set.items),
        "image_folder": str(image_set.folder),
        "trigger": image_set.trigger,
        "class_word": image_set.class_word,
        "base_model": {"name": base.name, "sha256": base.sha256, "family": base.family, "license": base.license},
        "license": licence.id,
        "license_source": licence.source,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "started_at": when(result.started_at),
        "finished_at": when(result.finished_at),
        "fingerprint": result.fingerprint,
    }
    if trainer.name == "embedding":
        record["token"] = embedding_token(job)
        record["vectors"] = int(result.vectors.shape[0])
    if image_set.regularisation:
        record["regularisation_images"] = image_set.regularisation
        record["regularisation_folder"] = str(image_set.regularisation_folder)
        record["images"] = len(image_set.items) - image_set.regularisation
    if getattr(result, "token", None) is not None and trainer.name == "lora":
        record["pivotal"] = {"token": result.token, "vectors": int(result.vectors.shape[0]),
                             "embedding": str(pivotal_embedding_path(job))}
    return record


def _sampler(job: TrainingJob, models, config, resolution: int, log: LogFn, written: list[str]) -> Callable[..., None]:
    """``on_sample``: render the sample prompts with the model as trained so far, one PNG each with its infotext.
    LoRA and DreamBooth train the loaded networks in place; an embedding trainer hands over its current vectors."""
    from safetensors.torch import save_file

    from engine.adapters.refs import AdapterFile
    from engine.pipeline import Pipeline
    from engine.requests import GenerationRequest
    from storage.image_metadata import encode_png, format_infotext, write_atomic

    folder = job.state_path / "samples"
    pipe: list[Pipeline] = []

    def on_sample(step: int, embedding: Any = None) -> None:  # an engine Embedding (embedding training only)
        if not pipe:
            pipe.append(Pipeline(models, max_batch_size=1))
        pipeline = pipe[0]
        pipeline.prompts.clear_cache()  # the text encoder (its LoRA, or itself) may have changed since the last samples
        folder.mkdir(parents=True, exist_ok=True)
        files: tuple[AdapterFile, ...] = ()
        if embedding is not None:
            # The pipeline takes embeddings as files (what a campaign request names), so the current vectors go
            # through the same reader and prompt placement a finished embedding will; one file per step, because
            # the pipeline caches embeddings by path.
            path = job.state_path / "sample-embeddings" / f"{embedding.name}-step-{step:06d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"emb_params": embedding.vectors.detach().cpu().float().contiguous()}, str(path))
            files = (AdapterFile(embedding.name, str(path)),)
        requests = [GenerationRequest(prompt=p, seed=config.seed, negative_prompt=SAMPLE_NEGATIVE, width=resolution,
                                      height=resolution, steps=job.sample_steps, embeddings=files) for p in job.prompts()]
        for i, result in enumerate(pipeline.generate(requests)):
            # The LoRA (or fine-tune) is in memory, so no tag names it: the infotext says which training and step.
            params = {**result.parameters, "Training": Path(job.out).stem, "Training step": str(step)}
            path = folder / f"step-{step:06d}-{i}.png"
            write_atomic(path, encode_png(result.image, format_infotext(result.request.prompt, SAMPLE_NEGATIVE, params)))
            written.append(str(path))
        log(f"samples at step {step}: {folder / f'step-{step:06d}-*.png'}")

    return on_sample


def run_training(job: TrainingJob, *, on_step: StepFn | None = None, log: LogFn = lambda _m: None,
                 on_loaded: Callable[[int, int], None] | None = None) -> TrainingOutcome:
    """Train, export and register as the module docstring says. Raises :class:`ImageSetError` (bad folder),
    :class:`LicenseError`, ``ValueError`` (settings, an occupied ``out``, a state folder of another training) or
    ``CheckpointError`` before anything is trained. ``on_loaded(first_step, total)``: training is about to start."""
    from engine.checkpoint import file_sha256

    wall = time.perf_counter()
    trainer = _load_trainer(job.kind)
    config = _make_config(trainer, job)
    base_path = _base_path(job)
    # The folder is checked before the database is opened (created): a refused folder leaves nothing behind.
    resolution = config.resolution or describe_model(base_path).native_size  # hashes the file; loads no weights
    image_set = load_image_set(job.images, trigger=job.trigger, class_word=job.class_word, min_side=resolution)
    if job.reg_images:
        if job.kind != "lora":
            raise ValueError(f"regularisation images are for LoRA training; {job.kind} training does not take them "
                             "(DreamBooth renders its own class images)")
        image_set = with_regularisation(image_set, load_regularisation_set(
            job.reg_images, trigger=job.trigger, class_word=job.class_word, min_side=resolution))
    db = _open_db(job) if job.register else None
    try:
        base = describe_model(base_path, db)  # the registered licence, if the base has a row
        licence = decide_licence(base, job.license)
        if licence.id is None:
            log(f"warning: the base model '{base.name}' has no licence on record; the output's licence is unknown")
        if hasattr(config, "for_family"):  # settings whose default depends on the base's family, decided as training does
            config = config.for_family(base.family)
        identity = trainer.fingerprint(config, image_set, base.sha256, resolution, job)
        out = Path(job.out)
        if out.exists():
            if _file_fingerprint(out, job.state_path) != identity:
                raise ValueError(f"{out} exists and is not the result of this training; choose another --out or remove it")
            return _already_trained(job, trainer, base, licence, db, out, wall, log)

        from engine.devices import resolve_device, resolve_dtype
        from engine.loading import load_checkpoint

        device = resolve_device(job.device)
        dtype = trainer.load_dtype if job.dtype == "auto" else job.dtype
        models = load_checkpoint(base_path, device=device, dtype=resolve_dtype(dtype, device, training=True))
        samples: list[str] = []
        on_sample = _sampler(job, models, config, resolution, log, samples) if job.sample_every else None
        announced = False

        def step(done: int, total: int, loss: float) -> None:
            nonlocal announced
            if not announced:
                announced = True
                if done > 1:
                    log(f"resumed at step {done - 1}")
                if on_loaded is not None:
                    on_loaded(done - 1, total)
            if on_step is not None:
                on_step(done, total, loss)

        result = trainer.train(models, image_set, config, job, step, on_sample)
        if not announced and result.resumed_from:
            log(f"resumed at step {result.resumed_from}")  # killed after the last save, before the export
        out.parent.mkdir(parents=True, exist_ok=True)
        trainer.export(out, result, models, image_set, config, job, licence.id, identity)
        sha = file_sha256(out)
        record = training_record(job, trainer, config, image_set, base, result, resolution, licence)
        _write_output_record(job.state_path, sha, identity, record)
        outcome = TrainingOutcome(str(out), sha, trainer.kind, result.steps, result.resumed_from, result.seconds,
                                  time.perf_counter() - wall, licence.id, licence.commercial_use, record, samples=samples)
        if db is not None:
            outcome.registered = _register(db, out, trainer, base, licence, record)
        return outcome
    finally:
        if db is not None:
            db.dispose()


def _write_output_record(state: Path, sha: str, identity: str, record: dict[str, Any]) -> None:
    """Lets a re-run recognise an output without fingerprint metadata, and rebuild the record without a database."""
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / (OUTPUT_FILE + ".part")
    tmp.write_text(json.dumps({"sha256": sha, "identity": identity, "record": record}, sort_keys=True))
    os.replace(tmp, state / OUTPUT_FILE)


def _register(db, out: Path, trainer: Trainer, base: ModelInfo, licence: Licence, record: dict[str, Any]) -> str:
    info = register_trained(db, out, kind=trainer.kind, family=base.family, license_id=licence.id,
                            commercial=licence.commercial_use, license_source=licence.source, training=record)
    commercial = {True: "allowed", False: "not allowed", None: "unknown"}[info.commercial_use]
    line = (f"registered {info.noun} {info.name} ({info.short_hash}, "
            f"{info.family}): licence {info.license or 'unknown'} from {base.name}, commercial use {commercial}")
    pivotal = record.get("pivotal")
    if pivotal and Path(pivotal["embedding"]).is_file():
        # A pivotal-tuned LoRA's embedding is half of the product: it carries the same licence and training record.
        emb = register_trained(db, pivotal["embedding"], kind="embedding", family=base.family, license_id=licence.id,
                               commercial=licence.commercial_use, license_source=licence.source, training=record)
        line += f"; with its embedding {emb.name} ({emb.short_hash}): prompts say {pivotal['token']!r}"
    return line


def _already_trained(job: TrainingJob, trainer: Trainer, base: ModelInfo, licence: Licence, db, out: Path, wall: float,
                     log: LogFn) -> TrainingOutcome:
    """``out`` is this very training (a re-run, or a retry after the export): keep the file, (re-)register it."""
    from engine.checkpoint import file_sha256

    log(f"{out} is already this training's result: nothing to train")
    record = _stored_record(db, out) if db is not None else None
    if record is None:
        written = _output_record(out, job.state_path)
        record = written["record"] if written and written.get("record") else _record_from_file(out, trainer)
    outcome = TrainingOutcome(str(out), file_sha256(out), trainer.kind, int(record.get("steps", 0)), int(record.get("steps", 0)),
                              float(record.get("seconds", 0.0)), time.perf_counter() - wall, licence.id,
                              licence.commercial_use, record, skipped=True)
    if db is not None:
        outcome.registered = _register(db, out, trainer, base, licence, record)
    return outcome


def _stored_record(db, out: Path) -> dict[str, Any] | None:
    from engine.checkpoint import file_sha256
    from flows.model_registry import training_record_of

    return training_record_of(db, file_sha256(out))


def _record_from_file(out: Path, trainer: Trainer) -> dict[str, Any]:
    """A training record rebuilt from the file's own metadata (registration was off the first time, and the state
    folder that held the full record is gone)."""
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata() or {}
    return {"trainer": trainer.name, "image_set_sha256": meta.get("adforge.image_set_sha256"),
            "images": int(meta.get("ss_num_train_images", 0)), "trigger": meta.get("adforge.trigger"),
            "class_word": meta.get("adforge.class_word"), "steps": int(meta.get("ss_steps", 0)),
            "base_model": {"name": meta.get("ss_sd_model_name"), "sha256": meta.get("adforge.base_model_sha256")},
            "fingerprint": meta.get("adforge.training_fingerprint"), "from_file_metadata": True}


# ------------------------------------------------------------------------------------------------ Prefect


def _is_input_problem(exc: BaseException) -> bool:
    """Bad images, licence, settings, an occupied output: a retry would fail the same way."""
    return isinstance(exc, ValueError)  # ImageSetError and LicenseError are ValueErrors


def _retry_unless_input_problem(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state holds the task's exception
        return not _is_input_problem(exc)
    return True


@task(name="train", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30, retry_condition_fn=_retry_unless_input_problem)
def _train_task(job: TrainingJob) -> dict[str, Any]:
    """Retries are safe: a retry resumes from the job's state folder (a crashed worker's last saved step)."""
    logger = get_run_logger()
    every = max(1, int(job.settings.get("steps", 1000)) // 20)

    def on_step(done: int, total: int, loss: float) -> None:
        if done % every == 0 or done == total:
            logger.info("step %d/%d loss %.4f", done, total, loss)

    outcome = run_training(job, on_step=on_step, log=logger.info)
    if outcome.registered:
        logger.info(outcome.registered)
    return asdict(outcome)


@flow(name="brand-training", log_prints=False)
def train_adapter(
    kind: str,
    images: str,
    trigger: str,
    class_word: str,
    out: str,
    model: str | None = None,
    settings: dict[str, Any] | None = None,
    state_dir: str | None = None,
    sample_every: int = 0,
    sample_prompts: list[str] | None = None,
    sample_steps: int = 20,
    device: str = "auto",
    dtype: str = "auto",
    license: str | None = None,
    register_output: bool = True,
    db_url: str | None = None,
    token: str | None = None,
    reg_images: str | None = None,
) -> dict[str, Any]:
    """Train a ``kind`` (``lora``, ``embedding``, ``dreambooth``) of ``model`` on the photos in ``images`` and register
    it. Paths are the worker's (relative to the project folder); ``settings`` are the trainer's (rank, steps, lr,
    resolution, vectors, num_class_images, pivotal_vectors, ...); ``token`` names an embedding (default: OUT's stem) or
    a pivotal-tuned LoRA's trigger embedding; ``reg_images`` is a LoRA's regularisation folder."""
    job = TrainingJob(kind=kind, images=images, trigger=trigger, class_word=class_word, out=out, model=model,
                      settings=dict(settings or {}), state_dir=state_dir, sample_every=sample_every,
                      sample_prompts=tuple(sample_prompts or ()), sample_steps=sample_steps, device=device, dtype=dtype,
                      license=license, register=register_output, db_url=db_url, token=token, reg_images=reg_images)
    return _train_task(job)


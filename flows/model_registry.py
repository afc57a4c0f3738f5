"""The model registry: every model file a run uses has a row in ``models`` (path, sha256, A1111 hash, family,
licence, whether commercial use is allowed).

``adforge models add PATH --license ID [--commercial yes|no]`` registers one; a file that was never registered is
entered on first use with the licence its own metadata declares (``modelspec.license``, as our bundled model and
many trainers write it) or, failing that, as unknown. Whether a row may use a model is the licence policy's
(:mod:`flows.licence_policy`).

A file adforge trained (``adforge train lora``, :mod:`flows.training`) is registered by :func:`register_trained` with
the licence its base model carries over and its training record (``models.training``).

LoRAs and textual-inversion embeddings are models too (``kind`` = ``lora`` / ``embedding``, ``family`` = the
checkpoint family they are for): a run enters the ones its prompts name, and the licence policy judges them like
checkpoints.

A diffusers folder (``model_index.json`` + ``unet/``, ``vae/``...) is a checkpoint like a single file: its sha256 is
:func:`engine.diffusers_folder.folder_sha256`, its name the folder's, its licence the ``license:`` of the model card
(``README.md`` front matter, as the Hugging Face Hub writes it) where the file's would be its metadata.

Upscaler files (ESRGAN-family ``.pth`` / ``.safetensors`` that spandrel recognises) are models like any other here:
same table (``kind`` = ``upscaler``), same registration. Their ``.pth`` files are read with ``weights_only``
unpickling.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from engine.checkpoint import PICKLE_SUFFIXES, CheckpointError, a1111_short_hash, file_sha256, open_state_dict
from engine.families import detect_family
from engine.upscale.chain import MODEL_SUFFIXES as UPSCALER_SUFFIXES
from flows.licence_policy import KNOWN_LICENSES, LicenseError, commercial_use_of, normalize_license
from storage.database import Database, audit
from storage.schema import ModelRecord

__all__ = ["ModelInfo", "describe_model", "ensure_model", "enter_model", "register_model", "register_trained",
           "training_record_of"]


@dataclass(frozen=True)
class ModelInfo:
    """What a plan needs to know of a model without loading it."""

    id: int
    path: str
    name: str
    sha256: str
    short_hash: str
    family: str
    license: str | None
    commercial_use: bool | None
    native_size: int
    kind: str = "checkpoint"  # checkpoint | upscaler | lora | embedding | controlnet (| vae, never rendered by a run)
    scale: int = 1  # an upscaler's scale, read from the model

    @property
    def noun(self) -> str:
        """What messages call it."""
        return {"upscaler": "upscaler", "lora": "LoRA", "embedding": "embedding", "controlnet": "ControlNet"}.get(self.kind, "model")

    @property
    def kind_phrase(self) -> str:
        """``a LoRA``, ``an upscaler``, ``a checkpoint`` ..."""
        return {"upscaler": "an upscaler", "lora": "a LoRA", "embedding": "an embedding", "vae": "a VAE",
                "checkpoint": "a checkpoint", "controlnet": "a ControlNet"}.get(self.kind, f"a {self.kind} file")


@dataclass(frozen=True)
class _Inspected:
    """What a model file is, read without building a diffusion model."""

    sha256: str
    family: str
    kind: str
    metadata: dict[str, str]
    native_size: int
    scale: int = 1


def _kind(family: str) -> str:
    return "checkpoint" if family.startswith("sd") else family


def _as_upscaler(path: Path) -> tuple[_Inspected | None, str | None]:
    """The file as an upscaler, or (None, why not)."""
    from engine.upscale.networks import UpscalerError, inspect_upscaler

    try:
        up = inspect_upscaler(path)
    except UpscalerError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    family = up.arch.lower().replace(" ", "-")[:32]
    return _Inspected(up.sha256, family, "upscaler", up.metadata, 0, up.scale), None


def _as_adapter(path: Path) -> _Inspected | None:
    """The file as a LoRA (kohya, LyCORIS, diffusers/PEFT) or a textual-inversion embedding, or None. Both are read
    by their keys first and weights-only, so ``.pt`` embeddings need no ``allow_pickle``."""
    from engine.adapters.detect import embedding_family, inspect_adapter
    from engine.adapters.lora_file import LoraInfo
    from engine.adapters.refs import AdapterError

    try:
        info = inspect_adapter(path)
    except AdapterError as exc:
        raise CheckpointError(path, str(exc).removeprefix(f"{path}: ")) from None
    if info is None:
        return None
    if isinstance(info, LoraInfo):
        return _Inspected(file_sha256(path), info.family, "lora", _file_metadata(path), 0)
    return _Inspected(file_sha256(path), embedding_family(info), "embedding", _file_metadata(path), 0)


def _as_controlnet(path: Path, allow_pickle: bool) -> _Inspected | None:
    """The file as a ControlNet (``control_model.*``, bare or diffusers keys), or None."""
    from engine.control_library import family_name
    from engine.controlnet_loading import inspect_controlnet

    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        return None
    try:
        info = inspect_controlnet(path, allow_pickle)
    except CheckpointError:
        return None
    return _Inspected(file_sha256(path), family_name(info.family), "controlnet", _file_metadata(path), 0)


def _file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's own metadata (a LoRA trainer's ``modelspec.license``...); none for pickles."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return {}
    try:
        return dict(open_state_dict(path).metadata)
    except CheckpointError:
        return {}


def _card_license(folder: Path) -> str | None:
    """The ``license:`` of a folder's model card (``README.md`` YAML front matter); None if there is none."""
    import yaml

    try:
        text = (folder / "README.md").read_text(encoding="utf-8")[:65536]
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    front, sep, _ = text[3:].partition("\n---")
    try:
        card = yaml.safe_load(front) if sep else None
    except yaml.YAMLError:
        return None
    value = card.get("license") if isinstance(card, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _inspect_folder(path: Path, allow_pickle: bool) -> _Inspected:
    """A diffusers folder, read (lazily) in the single-file layout as loading reads it."""
    from engine.diffusers_folder import open_folder

    sd = open_folder(path, allow_pickle=allow_pickle)
    detection = detect_family(sd)
    metadata = {"modelspec.title": path.name, **sd.metadata}
    if lic := _card_license(path):
        metadata["modelspec.license"] = lic
    native = _native_size(path, metadata, _family_native_size(sd, detection.family))
    return _Inspected(sd.sha256(), detection.name, _kind(detection.name), metadata, native)


def _inspect(path: Path, allow_pickle: bool) -> _Inspected:
    """What a model file (or diffusers folder) is; CheckpointError names the file and problem. A file that is no SD
    checkpoint but an upscaler spandrel recognises is an upscaler (``.pth`` ones read weights-only, without
    ``allow_pickle``); a LoRA or an embedding is that."""
    if path.is_dir():
        return _inspect_folder(path, allow_pickle)
    suffix = path.suffix.lower()
    adapter = _as_adapter(path)
    if adapter is not None:
        return adapter
    controlnet = _as_controlnet(path, allow_pickle)
    if controlnet is not None:
        return controlnet
    upscaler_problem = None
    if suffix in PICKLE_SUFFIXES and suffix in UPSCALER_SUFFIXES and not allow_pickle:
        found, upscaler_problem = _as_upscaler(path)
        if found is not None:
            return found
    try:
        sd = open_state_dict(path, allow_pickle=allow_pickle)
        try:
            detection = detect_family(sd)
            family = detection.name
            metadata = dict(sd.metadata)
            native_default = _family_native_size(sd, detection.family)
        finally:
            close = getattr(sd, "close", None)
            if close:
                close()
    except CheckpointError as exc:
        if suffix in UPSCALER_SUFFIXES and exc.key is None:
            if upscaler_problem is None:
                found, upscaler_problem = _as_upscaler(path)
                if found is not None:
                    return found
            raise CheckpointError(path, f"{str(exc).removeprefix(f'{path}: ')}; nor is it an upscaler: {upscaler_problem}") from None
        raise
    return _Inspected(file_sha256(path), family, _kind(family), metadata, _native_size(path, metadata, native_default))


def _family_native_size(sd, family) -> int:
    """The family's training size (SDXL 1024; SD 2.x 768 for its v models, 512 for eps ones), as loading decides it."""
    from engine.loading import SD1_NATIVE_SIZE, resolve_prediction

    if family is None:
        return SD1_NATIVE_SIZE
    if family.name == "sd2":
        return 512 if resolve_prediction(sd, family) == "eps" else family.native_size
    return family.native_size


def _native_size(path: Path, metadata: dict[str, str], default: int) -> int:
    from engine.loading import META_NATIVE_SIZE

    try:
        native = int(metadata.get(META_NATIVE_SIZE, default))
    except ValueError:
        return default
    # Planning sizes every channel from it: a size no model trains at would only fail later, less clearly.
    if not 8 <= native <= 8192:
        raise CheckpointError(path, f"its metadata declares {META_NATIVE_SIZE} {native}, not a size in 8 .. 8192 px")
    return native


def _info(record: ModelRecord, found: _Inspected) -> ModelInfo:
    return ModelInfo(id=record.id, path=record.path, name=record.name, sha256=record.sha256, short_hash=record.short_hash,
                     family=record.family, license=record.license, commercial_use=record.commercial_use,
                     native_size=found.native_size, kind=found.kind, scale=found.scale)


def register_model(db: Database, path: str | os.PathLike[str], license_id: str, commercial: bool | None = None, *,
                   name: str | None = None, actor: str = "cli", allow_pickle: bool = False) -> ModelInfo:
    """Register (or re-register) a model file with its licence. ``commercial`` defaults to what
    :data:`KNOWN_LICENSES` says; an unknown licence id needs it stated."""
    p = Path(path)
    if not (p.is_file() or p.is_dir()):
        raise LicenseError(f"{p}: no such model file or folder")
    lic = normalize_license(license_id)
    if not lic:
        raise LicenseError("the licence id must not be empty")
    if commercial is None:
        if lic not in KNOWN_LICENSES:
            raise LicenseError(
                f"unknown licence '{license_id}': say whether it allows commercial use with --commercial yes|no "
                f"(known: {', '.join(sorted(KNOWN_LICENSES))})"
            )
        commercial = KNOWN_LICENSES[lic]
    found = _inspect(p, allow_pickle)
    sha = found.sha256
    with db.session() as s:
        record = s.scalar(select(ModelRecord).where(ModelRecord.sha256 == sha))
        before = None
        if record is None:
            record = ModelRecord(sha256=sha, short_hash=a1111_short_hash(sha), name=name or _default_name(p), path=str(p.resolve()),
                                 family=found.family, kind=found.kind)
            s.add(record)
        else:
            before = {"license": record.license, "commercial_use": record.commercial_use, "license_source": record.license_source}
            if name:
                record.name = name
            record.path = str(p.resolve())
        record.license, record.commercial_use, record.license_source = lic, commercial, "registered"
        s.flush()
        audit(s, actor=actor, action="model.registered", entity="model", entity_id=record.id, before=before,
              after={"path": record.path, "sha256": sha, "license": lic, "commercial_use": commercial})
        return _info(record, found)


def _from_file(p: Path, found: _Inspected) -> ModelInfo:
    """What the file itself declares (``id`` 0: not registered)."""
    declared = found.metadata.get("modelspec.license")
    lic = normalize_license(declared) if declared else None
    return ModelInfo(id=0, path=str(p.resolve()), name=found.metadata.get("modelspec.title") or _default_name(p), sha256=found.sha256,
                     short_hash=a1111_short_hash(found.sha256), family=found.family, license=lic,
                     commercial_use=commercial_use_of(lic), native_size=found.native_size, kind=found.kind, scale=found.scale)


def _default_name(p: Path) -> str:
    """A file's name without its suffix; a folder's whole name (``sdxl-base-1.0`` has no suffix to drop)."""
    return p.name if p.is_dir() else p.stem


def _inspect_file(path: str | os.PathLike[str], allow_pickle: bool) -> tuple[Path, _Inspected]:
    p = Path(path)
    if not (p.is_file() or p.is_dir()):
        raise CheckpointError(p, "no such model file or folder")
    return p, _inspect(p, allow_pickle)


def ensure_model(db: Database, path: str | os.PathLike[str], *, allow_pickle: bool = False, actor: str = "system:run") -> ModelInfo:
    """The model's row, entered on first use with the licence its file metadata declares (or unknown)."""
    p, found = _inspect_file(path, allow_pickle)
    with db.session() as s:
        return _info(enter_model(s, _from_file(p, found), actor=actor), found)


def enter_model(s, info: ModelInfo, *, actor: str = "system:run") -> ModelRecord:
    """The row of a model :func:`describe_model` described, entered in session ``s`` if it is new (with the licence
    its file declared, else unknown; a known one moved to ``info.path`` gets that path). For callers that are already
    inside a transaction, such as recording a plan."""
    record = s.scalar(select(ModelRecord).where(ModelRecord.sha256 == info.sha256))
    if record is not None:
        if record.path != info.path:
            record.path = info.path  # moved or copied: same bytes, same model
        return record
    record = ModelRecord(
        sha256=info.sha256, short_hash=info.short_hash, name=info.name, path=info.path, family=info.family, kind=info.kind,
        license=info.license, commercial_use=info.commercial_use, license_source="file-metadata" if info.license else "unknown",
    )
    s.add(record)
    s.flush()
    audit(s, actor=actor, action="model.discovered", entity="model", entity_id=record.id,
          after={"path": record.path, "sha256": info.sha256, "license": info.license, "commercial_use": info.commercial_use,
                 "license_source": record.license_source})
    return record


def describe_model(path: str | os.PathLike[str], db: Database | None = None, *, allow_pickle: bool = False) -> ModelInfo:
    """Like :func:`ensure_model` but writes nothing: the registered row if there is one, else what the file
    declares (``id`` 0)."""
    p, found = _inspect_file(path, allow_pickle)
    if db is not None:
        with db.session() as s:
            record = s.scalar(select(ModelRecord).where(ModelRecord.sha256 == found.sha256))
            if record is not None:
                return _info(record, found)
    return _from_file(p, found)


def register_trained(db: Database, path: str | os.PathLike[str], *, kind: str, family: str, license_id: str | None,
                     commercial: bool | None, license_source: str, training: dict, actor: str = "system:training") -> ModelInfo:
    """Register a file adforge trained: ``kind`` / ``family`` as the trainer says (the base's family), the licence
    the trainer decided (the base's carried over, ``license_source`` "inherited", or a stricter "override"), and the
    training record. Re-registering the same bytes updates the row (a re-run of a finished training)."""
    p = Path(path)
    found = _inspect(p, allow_pickle=False)
    if found.kind != kind:
        raise CheckpointError(p, f"expected {kind} file, but it reads as {found.kind}")
    record_json = json.dumps(training, sort_keys=True, separators=(",", ":"))
    with db.session() as s:
        record = s.scalar(select(ModelRecord).where(ModelRecord.sha256 == found.sha256))
        before = None
        if record is None:
            record = ModelRecord(sha256=found.sha256, short_hash=a1111_short_hash(found.sha256), name=_default_name(p),
                                 path=str(p.resolve()), family=family, kind=kind)
            s.add(record)
        else:
            before = {"license": record.license, "commercial_use": record.commercial_use,
                      "license_source": record.license_source, "path": record.path}
            record.path = str(p.resolve())
        record.license, record.commercial_use, record.license_source = license_id, commercial, license_source
        record.training = record_json
        s.flush()
        audit(s, actor=actor, action="model.trained", entity="model", entity_id=record.id, before=before,
              after={"path": record.path, "sha256": found.sha256, "license": license_id, "commercial_use": commercial,
                     "license_source": license_source, "base_sha256": training.get("base_model", {}).get("sha256"),
                     "image_set_sha256": training.get("image_set_sha256")})
        return _info(record, found)


def training_record_of(db: Database, sha256: str) -> dict | None:
    """The training record of the registered model with this sha256; None if it has none (or no row)."""
    with db.session() as s:
        text = s.scalar(select(ModelRecord.training).where(ModelRecord.sha256 == sha256))
    return json.loads(text) if text else None

"""Run settings: command-line flag > environment variable > ``adforge.toml`` > default.

Defaults need no setup: a SQLite file and an asset folder under ``./adforge-data/`` and the bundled model.

``adforge.toml`` (current folder, or ``--config PATH`` / ``ADFORGE_CONFIG``)::

    db_url = "postgresql+psycopg://adforge@db.internal/adforge"
    store_url = "s3://brand-assets/adforge?endpoint_url=https://minio.internal:9000"
    model = "models/brand-v3.safetensors"
    refiner = "models/sdxl-refiner.safetensors"   # SDXL only: finishes each base render
    refiner_switch = 0.8                          # the share of the schedule the base runs first
    sampler = "DPM++ 2M Karras"
    steps = 25
    cfg_scale = 7.0
    blocklist = "policy/blocklist.txt"  # terms no prompt may hold (default templates/blocklist.txt; "off" turns it off)
    fast = "cache:3"         # a fast mode for every image (channels.yaml and brief rows may say otherwise); default off
    batch_size = 4
    device = "auto"
    devices = "all"          # render workers: all | cpu | cuda:0,cuda:1 (one worker process per entry)
    fan_out = 1              # shards as Prefect flow runs of the campaign-shard deployment (many machines)
    model_dirs = ["models", "/srv/checkpoints"]   # where a brief's ``model`` column may point
    lora_dir = "models/loras"            # <lora:NAME:weight> in prompts: NAME.safetensors here
    embeddings_dir = "models/embeddings" # textual-inversion embeddings, used by writing their name in a prompt
    controlnet_dir = "models/controlnet" # ControlNets for briefs' control_image rows, chosen by type word
    brief_max_rows = 20000   # and the other brief_max_* caps (flows/brief_limits.py)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from flows.brief_limits import BriefLimits
from flows.content_filter import OFF, BlocklistError, load_blocklist
from flows.fast_setting import FastModeError, canonical_fast
from flows.image_filter import resolve_setting as resolve_safety_checker
from storage.database import sqlite_url

__all__ = ["ENV_VARS", "Settings", "SettingsError", "devices_problem", "load_settings"]

DATA_DIR = Path("adforge-data")
CONFIG_FILE = "adforge.toml"
ENV_VARS = {
    "db_url": "ADFORGE_DB_URL",
    "store_url": "ADFORGE_STORE_URL",
    "model": "ADFORGE_MODEL",
    "refiner": "ADFORGE_REFINER",
    "refiner_switch": "ADFORGE_REFINER_SWITCH",
    "device": "ADFORGE_DEVICE",
    "devices": "ADFORGE_DEVICES",
    "fan_out": "ADFORGE_FAN_OUT",
    "model_dirs": "ADFORGE_MODEL_DIRS",
    "blocklist": "ADFORGE_BLOCKLIST",
    "safety_checker": "ADFORGE_SAFETY_CHECKER",
    "watermark": "ADFORGE_WATERMARK",
    "c2pa_cert": "ADFORGE_C2PA_CERT",
    "c2pa_key": "ADFORGE_C2PA_KEY",
    "c2pa_trust": "ADFORGE_C2PA_TRUST",
    "price_per_device_hour": "ADFORGE_PRICE_PER_DEVICE_HOUR",
    "metrics_port": "ADFORGE_METRICS_PORT",
    "allow_any_model_path": "ADFORGE_ALLOW_ANY_MODEL_PATH",
    "lora_dir": "ADFORGE_LORA_DIR",
    "embeddings_dir": "ADFORGE_EMBEDDINGS_DIR",
    "controlnet_dir": "ADFORGE_CONTROLNET_DIR",
}
_LIMITS = BriefLimits()


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    db_url: str
    store_url: str
    model: str | None = None  # None = the bundled model
    # An SDXL refiner checkpoint that finishes every SDXL base render after the base has run ``refiner_switch`` of
    # the schedule (A1111's "Refiner" / "Switch at"); None = no refiner.
    refiner: str | None = None
    refiner_switch: float = 0.8
    sampler: str = "DPM++ 2M Karras"
    steps: int = 25
    cfg_scale: float = 7.0
    clip_skip: int = 1
    # The fast mode (flows.fast_setting) of images whose channel and row say none: canonical text, "" = exact.
    fast: str = ""
    # The prompt blocklist (flows.content_filter): a file's path, None = the shipped templates/blocklist.txt, "" = off.
    blocklist: str | None = None
    # The image filter (flows.image_filter): the SD safety checker's weights (a diffusers ``safety_checker`` folder
    # or its model.safetensors); None = models/safety_checker when it exists, else off; "" = off.
    safety_checker: str | None = None
    # The invisible watermark in every delivered file (flows.watermark_step): "on" (an adforge asset identifier),
    # "off", or a payload of the user's own (see the README's "Watermark").
    watermark: str = "on"
    # C2PA content credentials (flows.credentials_step): the signing certificate chain (PEM) and its private key;
    # both None = unsigned. ``c2pa_trust``: extra trust anchors (PEM) that ``adforge verify`` accepts.
    c2pa_cert: str | None = None
    c2pa_key: str | None = None
    c2pa_trust: str | None = None
    # Metrics (flows.run_metrics): the price of one device-hour, for the cost per image (0 = no cost shown), and
    # the port a render worker serves Prometheus /metrics on (0 = none).
    price_per_device_hour: float = 0.0
    metrics_port: int = 0
    batch_size: int = 4
    device: str = "auto"
    # Render worker processes, one per entry (flows/device_pool.py): "auto" (every visible GPU, or ``device`` when
    # that names one, else the CPU), "all", "cpu", or a list such as "cuda:0,cuda:1" ("cpu,cpu": two CPU workers).
    devices: str = "auto"
    # > 1: the run's batches go out as this many shards, flow runs of the campaign-shard deployment that Prefect
    # workers on other machines pick up (flows/sharding.py); 1 renders here.
    fan_out: int = 1
    dtype: str = "auto"
    templates_dir: str | None = None  # None = the project's templates/
    # Folders a brief's ``model`` column may name files in, joined with os.pathsep (a list in adforge.toml); None =
    # ./models and the bundled model's folder. The folder of the run's default model is always allowed. A brief
    # author can otherwise probe the render machine's files ("no such model file", "only 3 bytes").
    model_dirs: str | None = None
    allow_any_model_path: bool = False
    # Where ``<lora:NAME:w>`` tags and embedding names in prompts are looked up, by file stem (never as paths, so a
    # brief cannot reach other files); relative to where adforge runs.
    lora_dir: str = "models/loras"
    embeddings_dir: str = "models/embeddings"
    # Where a brief row's ControlNet is found for its control_type (engine.control_library); the one shipped beside
    # the bundled model is found after it.
    controlnet_dir: str = "models/controlnet"
    # Caps on a brief, checked while it is read (flows/brief_limits.py says what each counts).
    brief_max_bytes: int = _LIMITS.max_bytes
    brief_max_xlsx_bytes: int = _LIMITS.max_xlsx_bytes
    brief_max_rows: int = _LIMITS.max_rows
    brief_max_cells: int = _LIMITS.max_cells
    brief_max_cell_chars: int = _LIMITS.max_cell_chars
    brief_max_variants_per_row: int = _LIMITS.max_variants_per_row
    brief_max_variants_per_brief: int = _LIMITS.max_variants_per_brief

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def redacted(self) -> dict[str, Any]:
        """For the database and logs: passwords in URLs hidden."""
        from sqlalchemy.engine import make_url

        out = self.to_dict()
        try:
            out["db_url"] = make_url(self.db_url).render_as_string(hide_password=True)
        except Exception:
            out["db_url"] = "<unparseable>"
        return out


_TYPES = {f.name: f.type for f in fields(Settings)}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _TYPES[name]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise SettingsError(f"{source}: '{name}' must be true or false, got {value!r}")
    if name == "model_dirs" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return os.pathsep.join(value)
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: '{name}' must be a {'whole number' if kind == 'int' else 'number'}, got {value!r}") from None
    if not isinstance(value, str):
        raise SettingsError(f"{source}: '{name}' must be a string, got {value!r}")
    return value


def devices_problem(value: str) -> str | None:
    """What is wrong with a ``devices`` value's syntax, or None. Whether the GPUs exist is checked where the
    workers start (a shard's machine resolves its own)."""
    entries = [e.strip() for e in value.split(",")]
    if value.strip() in ("auto", "all"):
        return None
    for entry in entries:
        if entry in ("cpu", "cuda"):
            continue
        if entry.startswith("cuda:") and entry[5:].isdigit():
            continue
        shown = f"an empty entry in {value!r}" if not entry else f"{entry!r}"
        return f"has {shown}: use auto, all, cpu, cuda, cuda:N, or a comma-separated list such as cuda:0,cuda:1"
    return None


def load_settings(overrides: dict[str, Any] | None = None, *, config: str | os.PathLike[str] | None = None,
                  env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> Settings:
    """Resolve settings; ``overrides`` are command-line values (None = not given)."""
    env = dict(os.environ) if env is None else env
    base = Path(cwd) if cwd is not None else Path.cwd()
    values: dict[str, Any] = {
        "db_url": sqlite_url(base / DATA_DIR / "adforge.db"),
        "store_url": (base / DATA_DIR / "assets").resolve().as_posix(),
    }
    sources: dict[str, str] = {}  # where each value came from, for error messages
    # A relative --config / ADFORGE_CONFIG is relative to where adforge runs (``cwd``), like the store path.
    config_path = base / (Path(config) if config else (Path(env["ADFORGE_CONFIG"]) if env.get("ADFORGE_CONFIG") else CONFIG_FILE))
    if config or env.get("ADFORGE_CONFIG") or config_path.exists():
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{config_path}: cannot read config file: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{config_path}: invalid TOML: {exc}") from None
        table = data.get("adforge", data)  # a top-level [adforge] table or bare keys
        if not isinstance(table, dict):
            raise SettingsError(f"{config_path}: 'adforge' must be a table ([adforge]), got {table!r}")
        for key, value in table.items():
            if key not in _TYPES:
                raise SettingsError(f"{config_path}: unknown setting '{key}' (known: {', '.join(sorted(_TYPES))})")
            values[key] = _coerce(key, value, os.fspath(config_path))
            sources[key] = os.fspath(config_path)
    for key, var in ENV_VARS.items():
        if env.get(var):
            values[key] = _coerce(key, env[var], var)
            sources[key] = var
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, "command line")
            sources[key] = "command line"
    settings = Settings(**values)
    limits = tuple((f"brief_max_{name}", 1) for name in ("bytes", "xlsx_bytes", "rows", "cells", "cell_chars",
                                                          "variants_per_row", "variants_per_brief"))
    for key, low in (("steps", 1), ("batch_size", 1), ("cfg_scale", 0), ("fan_out", 1), *limits):
        if getattr(settings, key) < low:
            raise SettingsError(f"{sources.get(key, 'default')}: '{key}' must be >= {low}, got {getattr(settings, key)!r}")
    if not 0.0 < settings.refiner_switch <= 1.0:
        raise SettingsError(f"{sources.get('refiner_switch', 'default')}: 'refiner_switch' must be in (0, 1] (the share of "
                            f"the schedule the base model runs), got {settings.refiner_switch!r}")
    try:
        settings = replace(settings, fast=canonical_fast(settings.fast))
    except FastModeError as exc:
        raise SettingsError(f"{sources.get('fast', 'default')}: 'fast': {exc}") from None
    if settings.blocklist is not None:  # relative to where adforge runs; "off" and "" are stored as ""
        off = settings.blocklist.strip().lower() in OFF
        settings = replace(settings, blocklist="" if off else (base / settings.blocklist).resolve().as_posix())
    try:
        load_blocklist(settings.blocklist)
    except BlocklistError as exc:
        raise SettingsError(f"{sources.get('blocklist', 'default')}: 'blocklist': {exc}") from None
    try:  # the invisible watermark's payload (storage.watermark)
        from storage.watermark_payload import watermark_setting

        settings = replace(settings, watermark=watermark_setting(settings.watermark))
    except ValueError as exc:
        raise SettingsError(f"{sources.get('watermark', 'default')}: 'watermark': {exc}") from None
    # Metrics (flows.worker_metrics, storage.run_metrics): a price is money per device-hour; a port fits in 16 bits.
    if not 0.0 <= settings.price_per_device_hour < float("inf"):  # NaN fails both comparisons
        raise SettingsError(f"{sources.get('price_per_device_hour', 'default')}: 'price_per_device_hour' must be a "
                            f"number >= 0 (0 = no cost shown), got {settings.price_per_device_hour!r}")
    if not 0 <= settings.metrics_port <= 65535:
        raise SettingsError(f"{sources.get('metrics_port', 'default')}: 'metrics_port' must be in 0 .. 65535 "
                            f"(0 = no worker metrics), got {settings.metrics_port!r}")
    if settings.c2pa_cert or settings.c2pa_key or settings.c2pa_trust:  # checked now, not at a run's first image
        from flows.credentials_step import check_settings

        settings = check_settings(settings, sources, base)
    try:  # the image filter's weights: an absolute path, or "" for off (flows.image_filter)
        settings = replace(settings, safety_checker=resolve_safety_checker(settings.safety_checker, base))
    except ValueError as exc:
        raise SettingsError(f"{sources.get('safety_checker', 'default')}: 'safety_checker': {exc}") from None
    problem = devices_problem(settings.devices)
    if problem:
        raise SettingsError(f"{sources.get('devices', 'default')}: 'devices' {problem}")
    # A relative local store path in a config file or variable is relative to where adforge runs.
    if "://" not in settings.store_url:
        settings = replace(settings, store_url=(base / settings.store_url).resolve().as_posix())
    if settings.model_dirs:  # likewise its model folders
        folders = [(base / d).resolve().as_posix() for d in settings.model_dirs.split(os.pathsep) if d.strip()]
        settings = replace(settings, model_dirs=os.pathsep.join(folders) or None)
    # ... and its adapter folders.
    settings = replace(settings, lora_dir=(base / settings.lora_dir).resolve().as_posix(),
                       embeddings_dir=(base / settings.embeddings_dir).resolve().as_posix())
    return settings

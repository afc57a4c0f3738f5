"""The campaign run as a Prefect flow: validate -> plan -> render batches -> (post-process, store, record) -> finish.

* ``validate_brief``: read the brief, every problem with file / line / column; ``strict`` rejects on any.
* ``plan_run``: expand rows into variants (:mod:`flows.planning`), check models and licences, record the run
  and the plan, and return batches of *variant ids* still to render (grouped by model and size).
* ``render_batch``: one task per batch; loads the model once per process, renders, post-processes, stores and
  records each image (:mod:`flows.rendering`). It takes ids only, so it can run anywhere.
* ``render_on_devices``: instead, with more than one device (``devices``): one worker process per device, fed
  engine batches from a queue (:mod:`flows.device_pool`).
* ``fan_out`` > 1: instead, the batches go out as shards, flow runs of ``campaign_shard`` (the ``campaign-shard``
  deployment) that Prefect workers on other machines run (:mod:`flows.sharding`); each renders as above.
* ``finish_run``: counts, timings, status.

Nothing is written for a rejected brief: validation and planning touch the database only after the brief passed.
Re-running a brief skips what exists; a run killed at any point and started again completes the rest.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.exc import SQLAlchemyError

from flows.brief import Brief, BriefError, read_brief
from flows.brief_limits import BriefLimits
from flows.device_pool import DevicePool, PoolConfig, plan_workers
from flows.model_registry import ModelInfo, describe_model, ensure_model
from flows.counts import STAGES, RenderCounts
from flows.planning import Plan, default_model_path, plan_brief
from flows.recording import abandon_run, finish_run, mark_crashed_runs, note_plan, start_run, sync_plan
from flows.rendering import render_variants
from flows.settings import Settings, load_settings
from flows.credentials_step import summary_line as credentials_summary
from flows.image_filter import count_flagged, image_filter_label
from flows.worker_metrics import serve_render_metrics
from flows.channels import load_channels
from flows.styles import load_styles
from flows.input_images import StoreSource, store_inputs
from storage.assets import AssetStore, open_store
from storage.database import Database, DatabaseError, database_failure, open_database
from storage.retrying import is_permanent

__all__ = ["RunSummary", "campaign_run", "campaign_shard", "open_resources", "render_planned", "set_progress_listener"]

log = logging.getLogger(__name__)
TASK_BATCHES = 4

# ------------------------------------------------------------------------------------------------ progress

ProgressListener = Callable[[str, int], None]  # event ("planned" | "skipped" | "rendered" | "failed"), count
_listener: ProgressListener | None = None


def set_progress_listener(listener: ProgressListener | None) -> None:
    """The CLI's progress bar; events come from tasks in this process (Prefect runs them in threads)."""
    global _listener
    _listener = listener


def _emit(event: str, count: int) -> None:
    if _listener is not None and count:
        _listener(event, count)


# ------------------------------------------------------------------------------------------------ resources

_RESOURCES: dict[tuple[str, str], tuple[Database, AssetStore]] = {}
_RESOURCE_LOCK = threading.Lock()


def open_resources(settings: Settings) -> tuple[Database, AssetStore]:
    """One database engine and one store client per process and configuration."""
    key = (settings.db_url, settings.store_url)
    with _RESOURCE_LOCK:
        if key not in _RESOURCES:
            _RESOURCES[key] = (open_database(settings.db_url), open_store(settings.store_url))
        return _RESOURCES[key]


def close_resources() -> None:
    with _RESOURCE_LOCK:
        for db, _ in _RESOURCES.values():
            db.dispose()
        _RESOURCES.clear()


# ------------------------------------------------------------------------------------------------ tasks


@dataclass
class PlannedRun:
    run_id: int
    batches: list[list[int]]
    planned: int
    already_done: int
    problems: list[str]


@dataclass
class RunSummary:
    run_id: int | None
    status: str
    counts: dict[str, int]
    seconds: float
    store_url: str
    db_url: str
    problems: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    flow_run_id: str | None = None
    shards: list[dict] = field(default_factory=list)  # with fan-out: each shard's flow runs (worker, state)
    credentials: str = ""  # C2PA content credentials: "off (...)" or "signed by <subject>" (flows.credentials_step)
    image_filter: str = ""  # "sd-safety-checker <weights hash>", "" = off (flows.image_filter)


@task(name="validate-brief", cache_policy=NO_CACHE)
def validate_brief(brief_path: str, strict: bool, templates_dir: str | None, limits: BriefLimits | None = None,
                   blocklist: str | None = None) -> Brief:
    channels = load_channels(Path(templates_dir) / "channels.yaml" if templates_dir else None)
    return read_brief(brief_path, known_channels=set(channels), strict=strict, limits=limits, blocklist=blocklist)


def make_plan(brief: Brief, settings: Settings, db: Database | None, strict: bool, inputs_from: str | None = None) -> Plan:
    """Plan ``brief``; models are looked up in ``db`` (if given) but nothing is written. The rows' image paths are
    read from the brief's folder, or from the store at ``inputs_from`` (the S3 inbox a brief came from)."""
    tdir = Path(settings.templates_dir) if settings.templates_dir else None
    channels = load_channels(tdir / "channels.yaml" if tdir else None)
    styles = load_styles(tdir / "styles.yaml" if tdir else None)

    def resolve(path: str) -> ModelInfo:
        return describe_model(path, db)

    inputs = StoreSource(open_store(inputs_from), "") if inputs_from else None
    return plan_brief(brief, settings, channels=channels, styles=styles, resolve_model=resolve,
                      default_model=default_model_path(settings), strict=strict, inputs=inputs)


@task(name="plan-run", cache_policy=NO_CACHE)
def plan_run(brief: Brief, settings: Settings, strict: bool, flow_run_id: str | None, source: str | None = None,
             inputs_from: str | None = None, submission_id: int | None = None) -> PlannedRun:
    db, store = open_resources(settings)
    # Planning writes nothing, so a rejected brief leaves no trace; once it passed, models seen for the first
    # time are entered (with the licence their file declares) and the variants get their model ids.
    plan = make_plan(brief, settings, db, strict, inputs_from)
    # The input images go to the store before any variant that pins them is recorded: a worker anywhere finds them.
    store_inputs(store, list(plan.input_images.values()))
    entered: dict[str, ModelInfo] = {}
    for v in plan.variants:
        if v.model.id == 0 and v.model.sha256 not in entered:
            entered[v.model.sha256] = ensure_model(db, v.model.path)
    if entered:
        plan.variants = [replace(v, model=entered[v.model.sha256]) if v.model.id == 0 else v for v in plan.variants]
    crashed = mark_crashed_runs(db)
    if crashed:
        log.warning("runs %s died without reporting back; marked crashed (their finished work is kept)", crashed)
    run_id = start_run(db, source or os.fspath(brief.path), brief, settings, flow_run_id, submission_id)
    states = sync_plan(db, plan, run_id)
    groups: dict[tuple, list[int]] = {}
    done = 0
    for v in plan.variants:
        state = states[v.identity]
        if state.status == "done":
            done += 1
            continue
        groups.setdefault(v.batch_group, []).append(state.id)
    # A task renders several engine batches: Prefect's per-task cost (~10-40 ms) is then paid once per
    # TASK_BATCHES engine batches, while progress and records still follow every engine batch.
    size = settings.batch_size * TASK_BATCHES
    batches = [ids[i : i + size] for ids in groups.values() for i in range(0, len(ids), size)]
    note_plan(db, run_id, len(plan.variants), done)
    return PlannedRun(run_id=run_id, batches=batches, planned=len(plan.variants), already_done=done,
                      problems=[str(p) for p in plan.problems])


def _worth_retrying(_task, _task_run, state) -> bool:
    """A render task is retried after a failure, except when the database failed for good (full disk, damaged
    file): rendering the batch again would only fail again at recording it."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return exc is None or not (is_permanent(exc) or isinstance(exc, DatabaseError))


@task(name="render-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_worth_retrying)
def render_batch(run_id: int, variant_ids: list[int], settings: Settings) -> RenderCounts:
    db, store = open_resources(settings)
    counts = render_variants(variant_ids, db=db, store=store, run_id=run_id, device=settings.device,
                             dtype=settings.dtype, batch_size=settings.batch_size, on_event=_emit,
                             templates_dir=settings.templates_dir)
    _emit("skipped", counts.skipped)
    return counts


@task(name="render-on-devices", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=_worth_retrying)
def render_on_devices(run_id: int, batches: list[list[int]], settings: Settings) -> RenderCounts:
    """Every batch on one worker process per device; units of one engine batch go to whichever worker is free."""
    open_resources(settings)  # the database at head before the workers open it
    specs = plan_workers(settings.devices, settings.device)
    size = settings.batch_size
    units = [batch[i : i + size] for batch in batches for i in range(0, len(batch), size)]
    config = PoolConfig(db_url=settings.db_url, store_url=settings.store_url, dtype=settings.dtype, batch_size=size,
                        templates_dir=settings.templates_dir, metrics_port=settings.metrics_port)
    with DevicePool(specs, config) as pool:
        result = pool.run(run_id, units, on_event=_emit)
    log.info("run %s on %s: %s units per worker, %d re-queued after a worker died, %d out-of-memory halvings", run_id,
             ", ".join(s.name for s in specs), result.units_per_worker, result.requeued, result.counts.oom_halvings)
    _emit("skipped", result.counts.skipped)
    return result.counts


def render_planned(run_id: int, batches: list[list[int]], settings: Settings) -> RenderCounts:
    """Render ``batches`` here: on one device in this process, or on a worker process per device."""
    if not batches:
        return RenderCounts()
    specs = plan_workers(settings.devices, settings.device)
    if len(specs) > 1:
        return render_on_devices(run_id, batches, settings)
    local = replace(settings, device=specs[0].here)  # in this process: no pinning, so cuda:1 stays cuda:1
    serve_render_metrics(settings.metrics_port, specs[0].name, specs[0].here)
    return RenderCounts.total(render_batch(run_id, batch, local) for batch in batches)


def _fan_out(run_id: int, batches: list[list[int]], settings: Settings, flow_run_id: str | None,
             config: str | None) -> tuple[RenderCounts, list[dict]]:
    """Render ``batches`` as shards on the work pool's workers; counts come from the database once all are done."""
    from flows.sharding import ShardError, run_shards, shard_outcome

    db, _ = open_resources(settings)
    shown = 0

    def progress(recorded: int) -> None:
        nonlocal shown
        _emit("rendered", recorded - shown)
        shown = recorded

    t0 = time.perf_counter()
    report = run_shards(run_id, batches, settings, db=db, parent_flow_run_id=flow_run_id, on_progress=progress, config=config)
    outcome = shard_outcome(db, run_id, [i for batch in batches for i in batch])
    _emit("rendered", outcome["rendered"] - shown)
    _emit("skipped", outcome["skipped"])
    _emit("failed", outcome["failed"] + outcome["left"])
    if report.gave_up:
        raise ShardError("; ".join(report.gave_up))
    result = RenderCounts(rendered=outcome["rendered"], skipped=outcome["skipped"], failed=outcome["failed"] + outcome["left"],
                          flagged=count_flagged(db, run_id),
                          seconds={**dict.fromkeys(STAGES, 0.0), "engine": outcome["engine_seconds"],
                                   "shards": time.perf_counter() - t0})
    return result, report.shards


# ------------------------------------------------------------------------------------------------ flow


@flow(name="campaign-run", log_prints=False, validate_parameters=True)
def campaign_run(brief_path: str, strict: bool = False, overrides: dict | None = None, config: str | None = None,
                 source: str | None = None, inputs_from: str | None = None, submission_id: int | None = None) -> dict:
    """Render every planned variant of a brief; returns the run summary as a dict. ``source`` is where the brief
    really came from (an S3 URL the inbox downloaded it from), recorded instead of the local path; ``inputs_from``
    the store URL its image paths are relative to (the S3 inbox), instead of the brief's folder; ``submission_id``
    the web / API submission (review.submissions) that launched it, recorded on the run.

    A database that fails (full disk, damaged file, lost server) ends the run with a one-line
    :class:`~storage.database.DatabaseError` naming the database and the driver's reason."""
    settings = load_settings(overrides or {}, config=config)
    try:
        return _campaign_run(brief_path, strict, settings, config, source, inputs_from, submission_id)
    except SQLAlchemyError as exc:
        raise database_failure(settings.db_url, exc) from exc


def _campaign_run(brief_path: str, strict: bool, settings: Settings, config: str | None, source: str | None,
                  inputs_from: str | None = None, submission_id: int | None = None) -> dict:
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    if settings.fan_out == 1:
        plan_workers(settings.devices, settings.device)  # devices this machine lacks: refused before anything is recorded
    brief = validate_brief(brief_path, strict, settings.templates_dir, BriefLimits.from_settings(settings),
                           settings.blocklist)
    planned = plan_run(brief, settings, strict, str(flow_run.id) if flow_run.id else None, source, inputs_from,
                       submission_id)
    _emit("planned", planned.planned)
    _emit("skipped", planned.already_done)
    t_plan = time.perf_counter() - t0
    result = RenderCounts()
    shards: list[dict] = []
    error = None
    status = "completed"
    try:
        if settings.fan_out > 1 and planned.batches:
            result, shards = _fan_out(planned.run_id, planned.batches, settings,
                                      str(flow_run.id) if flow_run.id else None, config)
        else:
            result = render_planned(planned.run_id, planned.batches, settings)
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SQLAlchemyError):
            error = str(database_failure(settings.db_url, exc))
        raise
    finally:
        counts = (RenderCounts(skipped=planned.already_done) + result).run_counts(
            planned=planned.planned, invalid_rows=len(set(planned.problems)))
        if status == "completed" and counts["failed"]:
            status = "completed_with_failures"
        db, _ = open_resources(settings)
        seconds = time.perf_counter() - t0
        timings = {"plan": round(t_plan, 4), **{k: round(v, 4) for k, v in result.seconds.items()}, "total": round(seconds, 4)}
        if result.devices:  # device kind -> device-seconds, CUDA peak memory and utilisation (flows.device_use)
            timings["devices"] = {kind: use.record() for kind, use in result.devices.items()}  # type: ignore[assignment]
        _finish(db, settings, planned.run_id, status, counts, timings, error)
    return RunSummary(
        run_id=planned.run_id, status=status, counts=counts, seconds=seconds, store_url=settings.store_url,
        db_url=settings.redacted()["db_url"], problems=planned.problems, timings=timings,
        flow_run_id=str(flow_run.id) if flow_run.id else None, shards=shards,
        credentials=credentials_summary(settings),
        image_filter=image_filter_label(settings.safety_checker),
    ).__dict__


def _finish(db: Database, settings: Settings, run_id: int, status: str, counts: dict, timings: dict,
            error: str | None) -> None:
    """Record the run's end. If the database cannot take it (it is what failed), the run is remembered as
    abandoned: the next run in this process marks it failed, and once this process is gone, the next run on this
    host marks it crashed, so it never stays 'running'. The error in flight, if any, is the one reported."""
    try:
        finish_run(db, run_id, status, counts, timings, error)
    except SQLAlchemyError as exc:
        failure = database_failure(settings.db_url, exc)
        abandon_run(run_id, error or str(failure))
        log.error("run %s: could not record its end (%s): %s", run_id, status, failure)
        if error is None:  # nothing else failed: this is the run's error; else the error in flight is reported
            raise failure from exc


@flow(name="campaign-shard", log_prints=False, validate_parameters=True, retries=1, retry_delay_seconds=5)
def campaign_shard(run_id: int, batches: list[list[int]], shard_settings: dict | None = None,
                   config: str | None = None) -> dict:
    """One shard of a fanned-out run: render ``batches`` (variant ids, already planned and recorded by the run) on
    this machine's devices. Idempotent: variants that already have an asset are skipped, so running a shard again
    (a Prefect retry, a re-submission after a lost worker) never duplicates anything."""
    from flows.sharding import shard_settings as resolve

    settings = resolve(shard_settings or {}, config)
    result = render_planned(run_id, batches, settings)
    return {"run_id": run_id, "rendered": result.rendered, "failed": result.failed, "skipped": result.skipped,
            "worker": os.environ.get("PREFECT__WORKER_NAME"), "host": socket.gethostname(), "pid": os.getpid()}


__all__ += ["BriefError", "make_plan", "plan_run", "render_batch", "render_on_devices", "validate_brief"]

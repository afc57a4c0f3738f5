"""Many machines: a campaign run's batches as shards, each a flow run of the ``campaign-shard`` deployment, which
Prefect workers of the deployment's work pool pick up (one worker per GPU machine).

The run itself plans and records as always, then hands its batches out in ``fan_out`` shards through
``run_deployment`` and watches them:

* a shard that ends *completed* is done;
* one that ends *failed* or *crashed* (its process died and its worker said so) is submitted again, up to
  ``max_attempts`` flow runs per shard;
* one still pending or running on a worker that Prefect has not heard from for ``LOST_AFTER_HEARTBEATS``
  heartbeats (the machine died, or the worker with its flow-run process was killed) is marked *crashed* and
  submitted again; another worker of the pool takes it.

Every worker labels the flow runs it takes with ``prefect.worker.name``, and its heartbeats say whether it is
alive; both come from Prefect, nothing here keeps its own leases. Re-submitting is safe because a shard is
idempotent: it renders only variants without an asset, and the database keeps one asset per variant.

Shards receive variant ids (grouped in the run's batches) and settings, never images. The database and store
URLs go along unless the database URL carries a password: flow-run parameters are visible in Prefect's UI, so
then each worker must have the same database in its own environment (``ADFORGE_DB_URL``), and the shard
checks that it does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from flows.settings import Settings, load_settings
from storage.database import Database
from storage.schema import Asset, Variant

__all__ = ["SHARD_DEPLOYMENT", "ShardError", "ShardReport", "run_shards", "shard_parameters", "shard_settings", "split_into_shards"]

log = logging.getLogger(__name__)

SHARD_DEPLOYMENT = "campaign-shard/campaign-shard"
LOST_AFTER_HEARTBEATS = 3  # as Prefect's own foreman counts a worker offline
LOST_GRACE_SECONDS = 5.0  # on top: a busy machine's heartbeat may come late without the worker being gone
WORKER_LABEL = "prefect.worker.name"
UNREACHABLE_SECONDS = 120.0  # the Prefect server may be away this long before the run gives up on it


class ShardError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ splitting


def split_into_shards(batches: list[list[int]], n: int, batch_size: int) -> list[list[list[int]]]:
    """At most ``n`` shards with the same number of engine batches (of ``batch_size``) give or take one, each a
    contiguous slice of the run's batches, so a shard's batches stay within one model and size. More shards than
    machines balances better: a worker that finishes early takes the next shard."""
    units = [(g, batch[i : i + batch_size]) for g, batch in enumerate(batches) for i in range(0, len(batch), batch_size)]
    n = max(1, min(n, len(units)))
    shards: list[list[list[int]]] = []
    for k in range(n):
        shard: list[list[int]] = []
        last = None
        for g, ids in units[k * len(units) // n : (k + 1) * len(units) // n]:
            if g == last:
                shard[-1].extend(ids)  # the same planned batch continues: one model, one size
            else:
                shard.append(list(ids))
            last = g
        shards.append(shard)
    return shards


# ------------------------------------------------------------------------------------------------ settings


def _has_password(url: str) -> bool:
    try:
        return make_url(url).password is not None
    except Exception:
        return True  # not parseable here: do not put it where everyone can read it


def shard_parameters(settings: Settings) -> dict:
    """What a shard needs from the run's settings: where to read and write, and how to batch. The devices are the
    shard machine's own (its ``ADFORGE_DEVICES`` / adforge.toml)."""
    out: dict = {"store_url": settings.store_url, "batch_size": settings.batch_size, "dtype": settings.dtype}
    if _has_password(settings.db_url):
        out["expect_db_url"] = settings.redacted()["db_url"]
    else:
        out["db_url"] = settings.db_url
    return out


def shard_settings(parameters: dict, config: str | None = None) -> Settings:
    """A shard's settings: its machine's (environment, adforge.toml) with the run's ``parameters`` on top."""
    params = dict(parameters)
    expect = params.pop("expect_db_url", None)
    unknown = set(params) - {"db_url", "store_url", "batch_size", "dtype"}
    if unknown:
        raise ShardError(f"unknown shard settings: {', '.join(sorted(unknown))}")
    settings = load_settings(params, config=config)
    if expect is not None and settings.redacted()["db_url"] != expect:
        raise ShardError(f"this worker's database {settings.redacted()['db_url']} is not the run's {expect}: set "
                         f"ADFORGE_DB_URL (or db_url in adforge.toml) on the worker to the run's database")
    return settings


# ------------------------------------------------------------------------------------------------ supervising


@dataclass
class _Shard:
    index: int
    batches: list[list[int]]
    flow_runs: list[dict] = field(default_factory=list)  # {"id", "name", "worker", "state"} per attempt
    done: bool = False
    gave_up: str | None = None

    @property
    def current(self) -> dict:
        return self.flow_runs[-1]


@dataclass
class ShardReport:
    shards: list[dict]  # per shard: index, variants, flow_runs (id, name, worker, state), done
    resubmitted: int
    gave_up: list[str]


class _Liveness:
    """Whether a worker is still alive, from Prefect's record of it. Its heartbeat timestamp is the server's
    clock, so it is compared with itself: a worker whose timestamp has not moved for LOST_AFTER_HEARTBEATS of its
    own intervals (plus grace), as timed here, is gone; so is one the server marks offline or no longer lists."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[object, float]] = {}

    def lost(self, name: str, workers: dict, now: float) -> bool:
        worker = workers.get(name)
        if worker is None:
            return True
        if str(getattr(worker.status, "value", worker.status)).upper() == "OFFLINE":
            return True
        beat = worker.last_heartbeat_time
        previous = self._seen.get(name)
        if previous is None or previous[0] != beat:
            self._seen[name] = (beat, now)
            return False
        interval = worker.heartbeat_interval_seconds or 30
        return now - previous[1] > LOST_AFTER_HEARTBEATS * interval + LOST_GRACE_SECONDS


def run_shards(run_id: int, batches: list[list[int]], settings: Settings, *, db: Database,
               parent_flow_run_id: str | None = None, deployment: str = SHARD_DEPLOYMENT, poll_seconds: float = 1.0,
               max_attempts: int = 3, on_progress: Callable[[int], None] | None = None,
               config: str | None = None) -> ShardReport:
    """Submit ``batches`` as ``settings.fan_out`` shards and wait until each has completed (or given up after
    ``max_attempts`` flow runs). ``on_progress`` gets the number of assets the run has recorded so far."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Cancelling, Crashed

    shards = [_Shard(i, b) for i, b in enumerate(split_into_shards(batches, settings.fan_out, settings.batch_size))]
    params = shard_parameters(settings)
    resubmitted = 0
    liveness = _Liveness()

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(deployment).work_pool_name
        except ObjectNotFound:
            raise ShardError(f"fan-out needs the {deployment} deployment on the Prefect server "
                             f"(PREFECT_API_URL): run `prefect deploy --all` from the checkout; see README, "
                             f"'Many GPUs, many machines'") from None

        def submit(shard: _Shard) -> None:
            attempt = len(shard.flow_runs) + 1
            name = f"run-{run_id}-shard-{shard.index + 1}-of-{len(shards)}" + (f"-attempt-{attempt}" if attempt > 1 else "")
            flow_run = run_deployment(
                deployment, parameters={"run_id": run_id, "batches": shard.batches, "shard_settings": params, "config": config},
                timeout=0, flow_run_name=name, tags=["adforge", f"adforge-run-{run_id}"], as_subflow=True,
                # A retried parent flow run finds the shards it already submitted instead of submitting them again.
                idempotency_key=f"{parent_flow_run_id}:shard-{shard.index}:attempt-{attempt}" if parent_flow_run_id else None,
            )
            shard.flow_runs.append({"id": str(flow_run.id), "name": name, "worker": None, "state": "SCHEDULED"})
            log.info("run %s: shard %d/%d (%d batch(es)) submitted as flow run %s", run_id, shard.index + 1,
                     len(shards), len(shard.batches), name)

        def retry_or_give_up(shard: _Shard, why: str) -> None:
            nonlocal resubmitted
            if len(shard.flow_runs) >= max_attempts:
                shard.gave_up = f"shard {shard.index + 1}: {why}; gave up after {len(shard.flow_runs)} flow run(s)"
                log.error("run %s: %s", run_id, shard.gave_up)
                return
            log.warning("run %s: shard %d %s; submitting it again", run_id, shard.index + 1, why)
            try:
                submit(shard)
            except Exception as exc:  # the next poll sees the same ended flow run and tries again
                log.warning("run %s: could not submit shard %d again yet: %s", run_id, shard.index + 1, exc)
                return
            resubmitted += 1

        active = list(shards)
        try:
            for shard in shards:
                submit(shard)
            waiting_since = time.monotonic()
            unreachable_since: float | None = None
            while True:
                try:
                    workers = {w.name: w for w in client.read_workers_for_work_pool(pool)}
                    current = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(s.current["id"]) for s in active]))
                    runs = {str(r.id): r for r in client.read_flow_runs(flow_run_filter=current)}
                    for shard in active:  # past the server's page size
                        if shard.current["id"] not in runs:
                            runs[shard.current["id"]] = client.read_flow_run(UUID(shard.current["id"]))
                except Exception as exc:
                    # A server restart or a network blip is not the end of the run: the shards go on meanwhile.
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > UNREACHABLE_SECONDS:
                        raise ShardError(f"the Prefect server has not answered for {UNREACHABLE_SECONDS:.0f} s: {exc}") from exc
                    log.warning("run %s: Prefect server unreachable (%s); trying again", run_id, exc)
                    time.sleep(poll_seconds)
                    continue
                unreachable_since = None
                now = time.monotonic()
                for shard in active:
                    run = runs[shard.current["id"]]
                    state = run.state
                    kind = state.type if state is not None else StateType.SCHEDULED
                    worker = run.labels.get(WORKER_LABEL) if run.labels else None
                    shard.current.update(state=kind.value, worker=worker)
                    if kind == StateType.COMPLETED:
                        shard.done = True
                    elif kind == StateType.CANCELLED:
                        shard.gave_up = f"shard {shard.index + 1}: flow run {shard.current['name']} was cancelled"
                    elif kind in (StateType.FAILED, StateType.CRASHED):
                        message = (state.message or "").strip().splitlines()
                        retry_or_give_up(shard, f"ended {kind.value.lower()} on {worker or 'no worker'}"
                                                + (f" ({message[0]})" if message else ""))
                    elif kind in (StateType.PENDING, StateType.RUNNING) and worker and liveness.lost(worker, workers, now):
                        try:
                            client.set_flow_run_state(run.id, Crashed(message=f"worker {worker} stopped sending heartbeats"),
                                                      force=True)
                        except Exception as exc:  # the next poll finds it lost again
                            log.warning("run %s: could not mark flow run %s crashed yet: %s", run_id, run.id, exc)
                            continue
                        shard.current["state"] = StateType.CRASHED.value
                        retry_or_give_up(shard, f"was lost with worker {worker}")
                active = [s for s in active if not s.done and s.gave_up is None]
                if on_progress is not None:
                    on_progress(_recorded(db, run_id))
                if not active:
                    break
                if not workers and now - waiting_since > 60:
                    log.warning("run %s: no worker has joined work pool %r; shards wait (start one: prefect worker "
                                "start --pool %s --type process)", run_id, pool, pool)
                    waiting_since = now
                time.sleep(poll_seconds)
        except BaseException:
            # This run is going down: stop its shards rather than leave them rendering for nobody.
            for shard in active:
                try:
                    started = shard.current["state"] in (StateType.PENDING.value, StateType.RUNNING.value)
                    stop = Cancelling if started else Cancelled  # a process to stop, or nothing yet
                    client.set_flow_run_state(shard.current["id"], stop(message=f"run {run_id} stopped"), force=not started)
                except Exception:
                    log.warning("could not cancel flow run %s", shard.current["id"], exc_info=True)
            raise
    report = ShardReport(
        shards=[{"index": s.index, "variants": sum(map(len, s.batches)), "flow_runs": s.flow_runs, "done": s.done}
                for s in shards],
        resubmitted=resubmitted, gave_up=[s.gave_up for s in shards if s.gave_up])
    return report


def _recorded(db: Database, run_id: int) -> int:
    with db.session() as s:
        return s.scalar(select(func.count(Asset.id)).where(Asset.run_id == run_id)) or 0


def shard_outcome(db: Database, run_id: int, ids: list[int]) -> dict:
    """What became of ``ids`` once every shard has finished: rendered by this run, done by another (skipped),
    failed, or still without an asset (left: a shard that gave up). Engine seconds summed from the assets."""
    rendered = skipped = failed = 0
    engine = 0.0
    with db.session() as s:
        for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[i : i + 500]
            rows = s.execute(select(Variant.status, Asset.run_id, Asset.render_seconds)
                             .outerjoin(Asset, Asset.variant_id == Variant.id).where(Variant.id.in_(chunk))).all()
            for status, asset_run, seconds in rows:
                if asset_run == run_id:
                    rendered += 1
                    engine += seconds or 0.0
                elif asset_run is not None:
                    skipped += 1
                elif status == "failed":
                    failed += 1
    return {"rendered": rendered, "skipped": skipped, "failed": failed, "left": len(ids) - rendered - skipped - failed,
            "engine_seconds": engine}

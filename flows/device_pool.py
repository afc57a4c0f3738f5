"""Render workers on one machine: one process per device, each with the model loaded once and kept warm, fed
engine batches one at a time from a queue.

* :func:`plan_workers` turns the ``devices`` setting into worker specs: every visible GPU (``all``), the CPU,
  or an explicit list (``cuda:0,cuda:1``; ``cpu,cpu`` runs two CPU workers). A GPU worker is pinned with
  ``CUDA_VISIBLE_DEVICES`` (it sees one GPU, ``cuda:0``); CPU workers see none and split the cores.
* :class:`DevicePool` starts the workers and hands out *units* (one engine batch of variant ids) to whichever
  worker is free, so a slow unit (a larger size, a slower GPU) never holds up the others. A worker renders a
  unit exactly as the single-process path does (:func:`flows.rendering.render_variants`: engine, post-process,
  store, record in one transaction), so the files are the same bytes. Out-of-memory halving happens inside the
  engine.
* Overlap (:attr:`PoolConfig.overlap`, the default): a worker renders unit k+1 while unit k is delivered
  (post-processed, encoded, stored, recorded) on a thread of its own (:mod:`flows.device_worker`), so the device does
  not wait for the CPU. It says ``rendered`` when unit k's engine half is done; the coordinator then sends the next
  unit; ``done`` follows when unit k is recorded. A worker holds two units at most (one rendering, one delivering;
  idle workers are served first); without overlap, one.
* A worker that dies (killed, segfault, driver reset): every unit it held goes back to the front of the queue for
  the others, and a fresh worker takes the dead one's device (``restarts`` times per device). Nothing is
  duplicated: a unit is recorded in one transaction, a re-rendered unit skips variants that are already done, and
  the database keeps one asset per variant. A unit that took down ``unit_attempts`` workers is recorded as failed
  instead of killing the rest. Two units lost together cannot tell which one took the worker down: both count
  the loss, a unit once lost is rendered alone from then on, and a unit is given up only after a loss it met alone
  (an innocent neighbour is never failed for the other's crash).

CPU workers are started through a fork server that has imported the engine once (``forkserver`` start method):
the first pool in a process pays that import, later pools and replacement workers start in well under a
second. GPU workers are spawned (fresh interpreters) and pin their GPU before they import torch. CPU workers share
the cores: each gets its share of the threads (``ADFORGE_THREADS`` in its environment, which ``Pipeline.load`` keeps).

Messages, coordinator -> worker: ``("unit", index, run_id, ids)`` or ``None`` (stop); worker -> coordinator:
``(kind, index, payload)`` with kind ``ready`` / ``started`` / ``rendered`` / ``event`` / ``log`` / ``done`` /
``error`` / ``database`` / ``fatal``. One pipe per worker (not a shared queue): a worker killed mid-write can only
break its own pipe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait

from flows.counts import RenderCounts
from flows.device_worker import worker_main as _worker_main

__all__ = ["DeviceError", "DevicePool", "PoolConfig", "PoolError", "PoolResult", "WorkerSpec", "plan_workers"]

log = logging.getLogger(__name__)

EventFn = Callable[[str, int], None]
# (event, worker name, worker pid, unit index): dispatched | started | rendered | finished | requeued | died |
# respawned ("died": once per unit the worker held, or once with None)
Observer = Callable[[str, str, "int | None", "int | None"], None]


class PoolError(RuntimeError):
    pass


class DeviceError(ValueError):
    """A ``devices`` setting this machine cannot satisfy."""


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # what logs call it: "cuda:1", "cpu", "cpu#2"
    device: str  # the device inside the worker: "cuda:0" for a pinned GPU, "cpu"
    cuda_visible: str | None  # CUDA_VISIBLE_DEVICES for the worker ("" hides every GPU); None leaves it as is
    threads: int | None = None  # torch intra-op threads; None = torch's default

    @property
    def here(self) -> str:
        """The device as this (unpinned) process names it: ``cuda:1`` for the second GPU, ``cpu``."""
        return "cpu" if self.device == "cpu" else self.name


def plan_workers(devices: str = "auto", device: str = "auto", *, cuda_count: int | None = None,
                 visible: str | None = None, threads: int | None = None) -> list[WorkerSpec]:
    """Worker specs for a ``devices`` setting (see :class:`flows.settings.Settings`). ``auto`` is every visible GPU
    (or the CPU without one) unless the single-device setting ``device`` names one. ``cuda_count`` and
    ``visible`` (this process's ``CUDA_VISIBLE_DEVICES``) default to this machine's; ``threads``, the CPU threads to
    share out among the workers, defaults to what the environment says (``ADFORGE_THREADS``, or torch's count under
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``), else the free cores (:func:`engine.devices.free_cpu_threads`)."""
    value = devices.strip()
    if value == "auto":
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            return [WorkerSpec(device, device, None)]  # another backend (mps, xpu...): one in-process device
        value = "all" if device == "auto" else device
    import torch

    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if threads is None:
        threads = _cpu_threads()
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value == "all":
        entries = [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    else:
        entries = [e.strip() for e in value.split(",")]
    # Index i of this process's view is physical GPU visible[i] when CUDA_VISIBLE_DEVICES already narrows it.
    physical = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(cuda_count)]
    n_cpu = sum(e == "cpu" for e in entries)
    # Several workers share this process's threads (oversubscribed cores would slow every one of them).
    share = max(1, threads // len(entries))
    specs: list[WorkerSpec] = []
    cpu_seen = 0
    for entry in entries:
        if entry == "cpu":
            cpu_seen += 1
            specs.append(WorkerSpec("cpu" if n_cpu == 1 else f"cpu#{cpu_seen}", "cpu", "", share))
            continue
        if entry == "cuda":
            entry = "cuda:0"
        if not entry.startswith("cuda:") or not entry[5:].isdigit():
            raise DeviceError(f"unknown device {entry!r} in devices {devices!r}: use all, cpu, cuda or cuda:N")
        index = int(entry[5:])
        if cuda_count == 0:
            raise DeviceError(f"devices {devices!r} asks for {entry}, but this machine has no CUDA GPU (use --devices cpu)")
        if index >= cuda_count or index >= len(physical):
            raise DeviceError(f"device {entry} does not exist: {cuda_count} CUDA device(s) visible")
        specs.append(WorkerSpec(entry, "cuda:0", physical[index], share))
    return specs


# ------------------------------------------------------------------------------------------------ the workers


@dataclass(frozen=True)
class PoolConfig:
    db_url: str
    store_url: str
    dtype: str = "auto"
    batch_size: int = 4
    templates_dir: str | None = None  # brand kits for overlays (None: the project's templates/)
    # Called once in each worker before it renders (a picklable top-level function or partial): where a caller
    # sets up what a worker process needs beyond the engine, e.g. a test that gives the device less memory.
    worker_init: Callable[[], None] | None = None
    # Render unit k+1 while unit k is delivered (two units per worker at most); False: one unit at a time.
    overlap: bool = True
    # > 0: each worker serves Prometheus /metrics on this port + its index in the pool (flows.worker_metrics).
    metrics_port: int = 0


def _cpu_threads() -> int:
    """The threads this process would give torch on the CPU (as :func:`engine.devices.set_cpu_threads` chooses)."""
    import torch

    from engine.devices import THREAD_ENV, free_cpu_threads

    chosen = os.environ.get("ADFORGE_THREADS", "").strip()
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    if any(os.environ.get(name) for name in THREAD_ENV):
        return torch.get_num_threads()
    return free_cpu_threads()


# ------------------------------------------------------------------------------------------------ the pool


@dataclass
class _Unit:
    index: int
    ids: list[int]
    attempts: int = 0  # workers lost or errors raised while holding it
    alone: bool = False  # lost with a worker: from then on rendered without another unit beside it


@dataclass
class _Slot:
    spec: WorkerSpec
    proc: mp.process.BaseProcess | None = None
    conn: Connection | None = None
    state: str = "down"  # starting | up | dead
    pid: int | None = None
    held: list[_Unit] = field(default_factory=list)  # in dispatch order: [delivering, rendering] at most
    rendering: bool = False  # held[-1] is still in its engine half (no "rendered" yet)
    restarts: int = 0
    units_done: int = 0


@dataclass
class PoolResult:
    """What a pool's run did: the counts summed over workers, units re-queued after a worker died, and how many
    units each worker finished."""

    counts: RenderCounts = field(default_factory=RenderCounts)
    requeued: int = 0
    units_per_worker: dict[str, int] = field(default_factory=dict)


def _context(specs: Sequence[WorkerSpec]) -> mp.context.BaseContext:
    # GPU workers start as fresh interpreters (spawn): each pins its GPU before torch is imported, and nothing that
    # touched the CUDA driver is ever forked (a library probing for CUDA at import would make a fork server unsafe
    # for them). CPU workers fork from a server that has imported the engine once: starting them costs little.
    if any(s.device.startswith("cuda") for s in specs) or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Imported once in the fork server, so every worker starts with the engine already loaded (ignored once the
    # fork server is running).
    ctx.set_forkserver_preload(["flows.rendering", "flows.device_pool", "flows.device_worker", "storage.database",
                                "storage.assets"])
    return ctx


class DevicePool:
    """Worker processes for ``specs``; use as a context manager, then :meth:`run` one or more times."""

    def __init__(self, specs: Sequence[WorkerSpec], config: PoolConfig, *, restarts: int = 2, unit_attempts: int = 3,
                 observer: Observer | None = None, start_method: str | None = None):
        """``restarts``: replacement workers per device after a worker died; ``unit_attempts``: workers a unit may
        take down (or errors it may raise) before it is given up; ``observer``: called on every worker event;
        ``start_method``: ``spawn`` or ``forkserver`` (default: spawn for GPU workers, else forkserver)."""
        if not specs:
            raise ValueError("a device pool needs at least one worker")
        self.config = config
        self.restarts = restarts
        self.unit_attempts = unit_attempts
        self.observer = observer
        self._slots = [_Slot(spec) for spec in specs]
        self._ctx = mp.get_context(start_method) if start_method else _context(specs)
        self._db = None

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> "DevicePool":
        self.start()
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(terminate=exc_type is not None)

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        port = self.config.metrics_port and self.config.metrics_port + self._slots.index(slot)
        proc = self._ctx.Process(target=_worker_main, args=(child, slot.spec, replace(self.config, metrics_port=port),
                                                            dict(os.environ)),
                                 name=f"adforge-render-{slot.spec.name}", daemon=True)
        proc.start()
        child.close()
        slot.proc, slot.conn, slot.state, slot.pid = proc, parent, "starting", proc.pid
        slot.held, slot.rendering = [], False
        log.info("render worker %s starting (pid %s)", slot.spec.name, proc.pid)

    def close(self, terminate: bool = False) -> None:
        """Stop the workers: idle ones finish at once; with ``terminate`` (after an error) busy ones are stopped."""
        for slot in self._slots:
            if slot.proc is None or slot.state == "dead":
                continue
            if not terminate:
                try:
                    slot.conn.send(None)  # type: ignore[union-attr]
                except OSError:
                    pass
        for slot in self._slots:
            if slot.proc is None:
                continue
            slot.proc.join(timeout=0 if terminate else 30)
            if slot.proc.is_alive():
                slot.proc.terminate()
                slot.proc.join(timeout=5)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join()
            slot.conn.close()  # type: ignore[union-attr]
            slot.state = "dead"
        if self._db is not None:
            self._db.dispose()
            self._db = None

    @property
    def pids(self) -> dict[str, int | None]:
        return {slot.spec.name: slot.pid for slot in self._slots if slot.state != "dead"}

    # ---- running --------------------------------------------------------------------------------------------

    def run(self, run_id: int, units: Sequence[Sequence[int]], on_event: EventFn | None = None) -> PoolResult:
        """Render ``units`` (each one engine batch of variant ids) of run ``run_id`` on the workers."""
        pending: deque[_Unit] = deque(_Unit(i, list(ids)) for i, ids in enumerate(units) if ids)
        outstanding = len(pending)
        totals = PoolResult()
        while outstanding:
            self._dispatch(pending, run_id)
            live = [s for s in self._slots if s.state != "dead"]
            if not live:
                raise PoolError(f"every render worker died; {outstanding} batch(es) of run {run_id} not rendered")
            watched: dict[object, _Slot] = {}
            for slot in live:
                watched[slot.conn] = slot
                watched[slot.proc.sentinel] = slot  # type: ignore[union-attr]
            for ready in wait(list(watched), timeout=5.0):
                slot = watched[ready]
                if slot.state == "dead" or (ready is not slot.conn and ready != slot.proc.sentinel):  # type: ignore[union-attr]
                    continue  # already handled in this round (its pipe and its sentinel were both ready)
                outstanding -= self._service(slot, pending, run_id, totals, on_event, died=ready is not slot.conn)
        return totals

    def _dispatch(self, pending: deque[_Unit], run_id: int) -> None:
        """Hand out units: to idle workers first, then (with overlap) to workers whose one unit is delivering."""
        capacity = 2 if self.config.overlap else 1
        for slot in sorted(self._slots, key=lambda s: len(s.held)):
            if not pending:
                return
            if slot.state != "up" or slot.rendering or len(slot.held) >= capacity:
                continue
            if slot.held and (slot.held[0].alone or pending[0].alone):
                continue  # a unit lost beside another renders alone
            unit = pending.popleft()
            try:
                slot.conn.send(("unit", unit.index, run_id, unit.ids))  # type: ignore[union-attr]
            except OSError:  # died since it said it was free: the sentinel will tell; keep the unit
                pending.appendleft(unit)
                continue
            slot.held.append(unit)
            slot.rendering = True
            self._observe("dispatched", slot, unit.index)

    def _service(self, slot: _Slot, pending: deque[_Unit], run_id: int, totals: PoolResult, on_event: EventFn | None,
                 died: bool) -> int:
        """Handle what ``slot`` sent (all of it, if it died); returns how many units it finished."""
        finished = 0
        try:
            while slot.conn.poll():  # type: ignore[union-attr]
                finished += self._handle(slot, slot.conn.recv(), pending, totals, on_event)  # type: ignore[union-attr]
        except (EOFError, OSError):
            died = True
        if died or not slot.proc.is_alive():  # type: ignore[union-attr]
            finished += self._lost(slot, pending, run_id, totals, on_event)
        return finished

    def _handle(self, slot: _Slot, msg: tuple, pending: deque[_Unit], totals: PoolResult, on_event: EventFn | None) -> int:
        kind, index, payload = msg
        if kind == "ready":
            slot.state, slot.pid = "up", payload
            log.info("render worker %s ready (pid %s)", slot.spec.name, payload)
        elif kind == "log":
            level, name, text = payload
            logging.getLogger(name).log(level, "[render worker %s] %s", slot.spec.name, text)
        elif kind == "started":
            self._observe("started", slot, index)
        elif kind == "rendered":  # its engine half is done, its delivery runs: the worker can take the next unit
            slot.rendering = False
            self._observe("rendered", slot, index)
        elif kind == "event":
            if on_event is not None:
                on_event(*payload)
        elif kind == "done":
            self._take(slot, index)
            totals.counts += payload
            slot.units_done += 1
            totals.units_per_worker[slot.spec.name] = totals.units_per_worker.get(slot.spec.name, 0) + 1
            self._observe("finished", slot, index)
            return 1
        elif kind == "error":
            unit = self._take(slot, index)
            unit.attempts += 1
            log.error("render worker %s failed on a batch of %d (attempt %d of %d):\n%s", slot.spec.name, len(unit.ids),
                      unit.attempts, self.unit_attempts, payload)
            if unit.attempts >= self.unit_attempts:
                raise PoolError(f"a batch of {len(unit.ids)} variant(s) failed {unit.attempts} times; last error on "
                                f"{slot.spec.name}:\n{payload}")
            pending.appendleft(unit)
        elif kind == "fatal":
            slot.state = "dead"
            raise PoolError(payload)
        elif kind == "database":  # one line naming the database; another worker would meet the same database
            from storage.database import DatabaseError

            raise DatabaseError(payload)
        return 0

    def _take(self, slot: _Slot, index: int) -> _Unit:
        """The unit ``index`` that ``slot`` held, no longer held (finished, or failed with an error)."""
        [unit] = [u for u in slot.held if u.index == index]
        if slot.rendering and slot.held[-1] is unit:
            slot.rendering = False
        slot.held.remove(unit)
        return unit

    def _lost(self, slot: _Slot, pending: deque[_Unit], run_id: int, totals: PoolResult, on_event: EventFn | None) -> int:
        """``slot``'s worker is gone: re-queue the units it held (or give them up), start a replacement."""
        slot.proc.join(timeout=5)  # type: ignore[union-attr]
        code = slot.proc.exitcode  # type: ignore[union-attr]
        held, slot.held, slot.rendering, slot.state = slot.held, [], False, "dead"
        slot.conn.close()  # type: ignore[union-attr]
        for unit in held or [None]:
            self._observe("died", slot, unit.index if unit else None)
        if not held:
            log.warning("render worker %s (pid %s) died (exit code %s)", slot.spec.name, slot.pid, code)
        finished = 0
        for unit in reversed(held):  # back to the front of the queue, in their order
            unit.attempts += 1
            if unit.attempts >= self.unit_attempts and len(held) == 1:
                failed = self._give_up(unit, run_id, f"render worker died {unit.attempts} times on this batch "
                                                     f"(last: {slot.spec.name}, exit code {code})")
                totals.counts.failed += failed
                if on_event is not None and failed:
                    on_event("failed", failed)
                finished += 1
            else:
                log.warning("render worker %s (pid %s) died (exit code %s) holding a batch of %d; re-queued",
                            slot.spec.name, slot.pid, code, len(unit.ids))
                unit.alone = True
                pending.appendleft(unit)
                totals.requeued += 1
                self._observe("requeued", slot, unit.index)
        if slot.restarts < self.restarts:
            slot.restarts += 1
            self._spawn(slot)
            self._observe("respawned", slot, None)
        return finished

    def _give_up(self, unit: _Unit, run_id: int, error: str) -> int:
        """Record ``unit``'s unfinished variants as failed; returns how many."""
        from sqlalchemy import select

        from flows.recording import record_failure
        from storage.database import open_database
        from storage.schema import Variant

        if self._db is None:
            self._db = open_database(self.config.db_url, upgrade=False)
        with self._db.session() as s:
            todo = list(s.scalars(select(Variant.id).where(Variant.id.in_(unit.ids), Variant.status != "done")))
        log.error("%s; %d variant(s) recorded as failed", error, len(todo))
        record_failure(self._db, todo, run_id, error)
        return len(todo)

    def _observe(self, event: str, slot: _Slot, index: int | None) -> None:
        if self.observer is not None:
            self.observer(event, slot.spec.name, slot.pid, index)


def wait_until_ready(pool: DevicePool, timeout: float = 120.0) -> None:
    """For benchmarks: block until every worker has started (so start-up is not timed as rendering)."""
    deadline = time.monotonic() + timeout
    totals = PoolResult()
    while any(s.state == "starting" for s in pool._slots):
        if time.monotonic() > deadline:
            raise PoolError("render workers did not start in time")
        for slot in pool._slots:
            if slot.state == "starting" and slot.conn.poll(0.05):  # type: ignore[union-attr]
                pool._service(slot, deque(), 0, totals, None, died=False)

"""A render worker process of a device pool (:mod:`flows.device_pool`): its device set up and its model kept warm, it
renders the units the coordinator sends, one engine batch each.

With overlap (:attr:`~flows.device_pool.PoolConfig.overlap`, the default) a unit is rendered in two halves. The engine
half runs on the worker's main thread (:func:`flows.rendering.render_held`: claims, engine, hires fix); its delivery
(post-process, encode, store, record, then the claims given back: :meth:`flows.rendering.HeldRender.deliver`) runs on
one background thread that is kept across units (a :class:`~flows.delivery.DeliveryLine`). As soon as the engine half
of unit k has been handed to the line, the worker says ``rendered`` and the coordinator sends unit k+1, which renders
while unit k is delivered. ``done`` (with unit k's counts) is sent by the delivery thread once unit k is recorded and
its claims are released. The line holds one delivery at a time: before unit k+1's delivery starts, unit k's has ended
(and its ``done`` is in the pipe), so a worker holds two units at most, one rendering, one delivering.

Without overlap a unit is rendered and delivered on the main thread, then ``done``: one unit at a time, as before.

Messages, coordinator -> worker: ``("unit", index, run_id, ids)`` or ``None`` (stop); worker -> coordinator:
``(kind, index, payload)`` with kind ``ready`` / ``started`` / ``rendered`` / ``event`` / ``log`` / ``done`` /
``error`` / ``database`` / ``fatal``. The worker's threads share its pipe, one message at a time (:class:`_Sender`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.device_pool import PoolConfig, WorkerSpec
    from flows.rendering import HeldRender

__all__ = ["worker_main"]


def worker_main(conn: Connection, spec: WorkerSpec, config: PoolConfig, env: dict[str, str]) -> None:
    """One render worker: set up its device, then render units until told to stop."""
    # The coordinator's environment as of this worker's start (a fork-server child would otherwise see the fork
    # server's), then the device pin, before anything can initialise CUDA.
    os.environ.clear()
    os.environ.update(env)
    if spec.cuda_visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible
    if spec.threads:
        # Its share of the cores, kept by Pipeline.load (which gives torch the free cores unless ADFORGE_THREADS says).
        os.environ["ADFORGE_THREADS"] = str(spec.threads)
    # Ctrl-C reaches the whole process group; the coordinator stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        from flows.delivery import DeliveryLine
        from flows.rendering import render_held
        from storage.assets import open_store
        from storage.database import open_database

        if config.worker_init is not None:
            config.worker_init()
        db = open_database(config.db_url, upgrade=False)  # the coordinator's process has brought it to head
        store = open_store(config.store_url)
        from flows.worker_metrics import serve_render_metrics

        serve_render_metrics(config.metrics_port, spec.name, spec.device)
    except BaseException:
        conn.send(("fatal", None, f"render worker {spec.name} could not start:\n{traceback.format_exc()}"))
        raise
    out = _Sender(conn)
    _forward_logs(out)
    out.send(("ready", None, os.getpid()))
    try:
        # Leaving the block (stop, or the coordinator gone) lets the delivery in flight finish first.
        with DeliveryLine(background=config.overlap) as line:
            while True:
                try:
                    msg = conn.recv()
                except EOFError:  # the coordinator is gone
                    return
                if msg is None:
                    return
                _, index, run_id, ids = msg
                out.send(("started", index, None))
                try:
                    held = render_held(ids, db=db, store=store, run_id=run_id, line=line, device=spec.device,
                                       dtype=config.dtype, batch_size=config.batch_size,
                                       templates_dir=config.templates_dir,
                                       on_event=lambda event, n, i=index: out.send(("event", i, (event, n))))
                except Exception as exc:  # its claims are given back; the worker goes on with the next unit
                    _report(out, index, exc, config.db_url)
                    continue
                if config.overlap:
                    # Waits for the previous unit's delivery (its "done" sent), then delivers this one in the background.
                    line.submit(_deliver, held, index, out, config.db_url)
                    out.send(("rendered", index, None))
                else:
                    _deliver(held, index, out, config.db_url, inline=True)
    finally:
        db.dispose()


def _deliver(held: HeldRender, index: int, out: _Sender, db_url: str, *, inline: bool = False) -> None:
    """Unit ``index``'s delivery and its report: ``done`` with its counts, or what went wrong (never raises, so the
    line goes on with the next unit). ``inline``: on the render thread, all of whose time it is then counted as
    waiting (with overlap, the render thread's waits are charged by the line to the unit it renders)."""
    t0 = time.perf_counter()
    try:
        counts = held.deliver()
    except Exception as exc:
        _report(out, index, exc, db_url)
    else:
        if inline:
            from flows.delivery import WAIT

            counts.seconds[WAIT] = counts.seconds.get(WAIT, 0.0) + time.perf_counter() - t0
        out.send(("done", index, counts))


def _report(out: _Sender, index: int, exc: Exception, db_url: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, SQLAlchemyError):  # past the recording's own retries: the run cannot go on
        from storage.database import database_failure

        out.send(("database", index, str(database_failure(db_url, exc))))
    else:
        out.send(("error", index, traceback.format_exc()))


class _Sender:
    """A worker's pipe to the coordinator, shared by its threads (the delivery thread's events, log records and
    ``done`` meet the render thread's messages): one message at a time."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self._lock:
            self.conn.send(msg)


class _PipeLogHandler(logging.Handler):
    """Sends a worker's warnings and errors to the coordinator, which logs them as its own (so they reach the
    run's log, the CLI or Prefect, instead of a worker's inherited stderr)."""

    def __init__(self, conn: _Sender):
        super().__init__(logging.WARNING)
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(("log", None, (record.levelno, record.name, self.format(record))))
        except Exception:  # the coordinator is gone; nothing to tell
            pass


def _forward_logs(conn: _Sender) -> None:
    root = logging.getLogger()
    root.addHandler(_PipeLogHandler(conn))
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)

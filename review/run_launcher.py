"""Starting, watching and cancelling the runs the gallery submits: a local worker process or a Prefect deployment.

* **local** (no deployment configured): ``python -m cli run BRIEF --submission ID`` in its own session (process
  group), the database and store in its environment (not on its command line, where ``ps`` shows passwords), the
  gallery's adforge.toml as ``--config``, its output in ``submission-ID.log`` beside the stored brief. A thread
  waits for it and reports the exit code (:meth:`RunContext.watch`); after a gallery restart, reading the
  submission finds a process that is gone by its pid. Cancel: SIGTERM to the process group, SIGKILL after a grace.
* **prefect:<deployment>**: ``run_deployment(name, parameters, timeout=0)``; the flow run's state is polled by a
  thread. Cancel: the flow run is set to Cancelling (the worker stops it). The brief's path must be readable where
  the worker runs (a shared folder): briefs_dir is where they are kept.

A killed run resumes without duplicates when started again (runs are idempotent), so cancel never corrupts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LaunchError", "Launched", "RunContext", "process_alive"]

log = logging.getLogger(__name__)
GRACE_SECONDS = 5.0
PREFECT_POLL_SECONDS = 3.0
_CLI_FLAGS = {"steps": "--steps", "sampler": "--sampler", "cfg_scale": "--cfg", "fast": "--fast"}
TERMINAL_PREFECT = {"COMPLETED": "completed", "FAILED": "failed", "CRASHED": "failed", "CANCELLED": "cancelled"}


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Launched:
    pid: int | None = None
    host: str | None = None
    flow_run_id: str | None = None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child that exited but was not reaped yet is a zombie: gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class RunContext:
    """What the gallery needs to plan and start runs; ``app.state.runs``."""

    db_url: str
    store_url: str
    run_config: str | None
    briefs_dir: Path
    deployment: str | None
    webhook_secret: str | None
    price_per_device_hour: float = 0.0
    _children: dict[int, subprocess.Popen] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def backend(self) -> str:
        return f"prefect:{self.deployment}" if self.deployment else "local"

    def settings(self, options: dict[str, Any] | None = None):
        """Run settings as a worker would resolve them (the gallery's adforge.toml), with the submission's options."""
        from flows.settings import load_settings

        overrides = {"db_url": self.db_url, "store_url": self.store_url}
        overrides.update({k: v for k, v in (options or {}).items() if k != "strict"})
        return load_settings(overrides, config=self.run_config)

    # ------------------------------------------------------------------------------------------- launch

    def launch(self, submission_id: int, brief_path: Path, options: dict[str, Any],
               on_exit: Callable[[int, int | None], None]) -> Launched:
        if self.deployment:
            return self._launch_prefect(submission_id, brief_path, options, on_exit)
        return self._launch_local(submission_id, brief_path, options, on_exit)

    def log_file(self, brief_path: Path, submission_id: int) -> Path:
        return brief_path.parent / f"submission-{submission_id}.log"

    def _launch_local(self, submission_id: int, brief_path: Path, options: dict[str, Any],
                      on_exit: Callable[[int, int | None], None]) -> Launched:
        command = [sys.executable, "-m", "cli", "run", os.fspath(brief_path), "--submission", str(submission_id)]
        if options.get("strict"):
            command.append("--strict")
        for key, flag in _CLI_FLAGS.items():
            if options.get(key) not in (None, ""):
                command += [flag, str(options[key])]
        if self.run_config:
            command += ["--config", self.run_config]
        env = {**os.environ, "ADFORGE_DB_URL": self.db_url, "ADFORGE_STORE_URL": self.store_url,
               "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "160"}
        out = open(self.log_file(brief_path, submission_id), "ab")  # noqa: SIM115 (the child keeps it)
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=os.getcwd())
        except OSError as exc:
            raise LaunchError(f"cannot start the local worker: {exc.strerror or exc}") from None
        finally:
            out.close()
        with self._lock:
            self._children[submission_id] = proc

        def wait() -> None:
            code = proc.wait()
            with self._lock:
                self._children.pop(submission_id, None)
            try:
                on_exit(submission_id, code)
            except Exception:  # the next read of the submission settles it
                log.exception("submission %s: recording its end failed", submission_id)

        threading.Thread(target=wait, name=f"adforge-submission-{submission_id}", daemon=True).start()
        return Launched(pid=proc.pid, host=socket.gethostname())

    def _launch_prefect(self, submission_id: int, brief_path: Path, options: dict[str, Any],
                        on_exit: Callable[[int, int | None], None]) -> Launched:
        try:
            from flows.deployment_runs import start_flow_run

            overrides = {k: v for k, v in options.items() if k != "strict"}
            flow_run_id = start_flow_run(self.deployment, parameters={
                "brief_path": os.fspath(brief_path), "strict": bool(options.get("strict")), "overrides": overrides,
                "config": self.run_config, "submission_id": submission_id})
        except Exception as exc:
            raise LaunchError(f"cannot start a flow run of deployment {self.deployment!r}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        threading.Thread(target=self._poll_prefect, args=(submission_id, flow_run_id, on_exit),
                         name=f"adforge-submission-{submission_id}", daemon=True).start()
        return Launched(flow_run_id=flow_run_id)

    def prefect_state(self, flow_run_id: str) -> str | None:
        """The flow run's state type (COMPLETED, RUNNING, ...) or None when Prefect cannot be asked."""
        try:
            from flows.deployment_runs import flow_run_state

            return flow_run_state(flow_run_id)
        except Exception:
            return None

    def _poll_prefect(self, submission_id: int, flow_run_id: str, on_exit: Callable[[int, int | None], None]) -> None:
        while True:
            state = self.prefect_state(flow_run_id)
            if state in TERMINAL_PREFECT:
                try:
                    on_exit(submission_id, 0 if state == "COMPLETED" else 1)
                except Exception:
                    log.exception("submission %s: recording its end failed", submission_id)
                return
            time.sleep(PREFECT_POLL_SECONDS)

    # ------------------------------------------------------------------------------------------- cancel

    def cancel(self, submission_id: int, pid: int | None, host: str | None, flow_run_id: str | None) -> str:
        """Stop the run; returns what was done (for the audit log)."""
        if flow_run_id:
            try:
                from flows.deployment_runs import cancel_flow_run

                cancel_flow_run(flow_run_id)
                return f"flow run {flow_run_id} set to Cancelling"
            except Exception as exc:
                raise LaunchError(f"cannot cancel flow run {flow_run_id}: {exc}") from None
        if pid is None:
            return "no process"
        if host and host != socket.gethostname():
            raise LaunchError(f"the run's process is on {host}; cancel it there")
        with self._lock:
            proc = self._children.get(submission_id)
        try:
            os.killpg(pid, signal.SIGTERM)  # the whole group: its render workers and Prefect's temporary server
        except ProcessLookupError:
            return "process already gone"
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            if (proc.poll() is not None) if proc is not None else not process_alive(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait(timeout=GRACE_SECONDS)
        try:  # children left in the group (a device worker that ignored SIGTERM)
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return f"process group {pid} terminated"

    def alive(self, pid: int | None, host: str | None) -> bool | None:
        """Whether a local worker still runs; None when it runs elsewhere (cannot tell from here)."""
        if pid is None:
            return False
        if host and host != socket.gethostname():
            return None
        with self._lock:
            proc = next((p for p in self._children.values() if p.pid == pid), None)
        if proc is not None:
            return proc.poll() is None
        return process_alive(pid)

"""Prefect's temporary API server, tied to the life of the process that started it.

Without ``PREFECT_API_URL``, running a flow starts a temporary Prefect server: a ``python -m uvicorn`` child
process (``prefect.server.api.server.SubprocessASGIServer``, about 200 MB) that Prefect stops from an ``atexit``
hook. A run killed with SIGKILL (or SIGTERM, which skips ``atexit``) never runs that hook, and the server lived
on. Prefect 3.8.8 has no setting for this, so :func:`start_temporary_server` starts the server itself, from the
calling (main) thread, with a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)``): the kernel
stops the server when the process that started it dies, however it dies. Prefect's own code then finds that
server running and uses it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["start_temporary_server", "temporary_server_pid"]

_PR_SET_PDEATHSIG = 1
_LOCK = threading.Lock()


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the running program: libc is linked in
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:  # runs in the child between fork and exec: no imports, no allocation to speak of
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return hook


class _SubprocessDyingWithParent:
    """Stands in for the ``subprocess`` module inside Prefect's server module: the same, except that ``Popen``
    arms the parent-death signal. Only that module sees it; everything else uses ``subprocess`` as it is."""

    def __init__(self, hook: Callable[[], None]):
        self._hook = hook

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - the name Prefect calls
        kwargs.setdefault("preexec_fn", self._hook)
        return subprocess.Popen(*args, **kwargs)


def _uses_temporary_server() -> bool:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def start_temporary_server() -> int | None:
    """Start Prefect's temporary server now, from this thread, so that it dies with this process; returns its pid.
    Does nothing (None) when ``PREFECT_API_URL`` names a server, or one is already running.

    Call it from the main thread: the kernel sends the parent-death signal when the *thread* that started the
    child ends, and the main thread lives as long as the process."""
    if not _uses_temporary_server():
        return None
    from prefect.server.api import server as server_module

    with _LOCK:
        hook = _parent_death_hook()
        if hook is not None and not isinstance(server_module.subprocess, _SubprocessDyingWithParent):
            server_module.subprocess = _SubprocessDyingWithParent(hook)  # type: ignore[assignment]
        server = server_module.SubprocessASGIServer()
        server.start()
        return server.server_process.pid if server.server_process else None


def temporary_server_pid() -> int | None:
    """The pid of this process's temporary Prefect server, if one runs."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    process = getattr(server, "server_process", None)
    return process.pid if process is not None and process.poll() is None else None

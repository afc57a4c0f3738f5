"""Abusive inputs, each in a fresh process: the answer it gets (one line), its wall-clock seconds and the process's
peak resident memory. The probes live beside this file in ``abuse_*.py`` modules (``PROBES``: name -> function
taking a scratch folder and returning the one-line outcome); tests assert the behaviour, this prints the bounds.

    .venv/bin/python bench/abuse.py            # every probe
    .venv/bin/python bench/abuse.py brief      # the probes whose name contains "brief"
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
Probe = Callable[[Path], str]


def probes() -> dict[str, Probe]:
    found: dict[str, Probe] = {}
    for path in sorted(HERE.glob("abuse_*.py")):
        module = importlib.import_module(path.stem)
        found.update(module.PROBES)
    return found


def _run_one(name: str) -> None:
    """Child: run one probe in a scratch folder and print its outcome as JSON."""
    with tempfile.TemporaryDirectory(prefix="adforge-abuse-") as scratch:
        t = time.perf_counter()
        try:
            outcome = probes()[name](Path(scratch))
        except BaseException as exc:  # a probe that crashes is a finding, not a bench failure
            outcome = f"CRASH {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": " ".join(str(outcome).split())[:160], "seconds": seconds, "peak_mib": peak_kib / 1024}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("match", nargs="?", default="", help="run only probes whose name contains this")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a probe may take before it counts as unbounded")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    if args.probe:
        _run_one(args.probe)
        return 0
    names = [n for n in probes() if args.match in n]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {len(names)} probe(s), each in a fresh process")
    print(f"{'probe':<44} {'seconds':>8} {'peak MiB':>9}  outcome")
    for name in names:
        try:
            done = subprocess.run([sys.executable, __file__, "--probe", name], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT)
            row = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row = {"outcome": f"UNBOUNDED: still running after {args.timeout:g} s", "seconds": args.timeout, "peak_mib": float("nan")}
        except (json.JSONDecodeError, IndexError):
            row = {"outcome": f"DIED: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}",
                   "seconds": float("nan"), "peak_mib": float("nan")}
        print(f"{name:<44} {row['seconds']:8.2f} {row['peak_mib']:9.0f}  {row['outcome']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Abusive model files and generation requests (issue 28, engine items), each through the real command: crafted
safetensors headers (100 MB, nested ``[[[...``) into ``adforge generate``, ``adforge models inspect`` and planning's
model look-up; a code-running pickle under ``--allow-pickle``; sizes, seeds and counts no machine can render.

Run through ``bench/abuse.py engine``, which starts each probe in a fresh process and prints its seconds and peak RSS.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

HEADER_MB = 100  # the probe
NESTED_MB = 10  # under the header cap, so the JSON parser itself meets it


def _cli(*args: str) -> str:
    """Run ``adforge ARGS`` in-process; the outcome as one line (exit code, then the message unboxed)."""
    from typer.testing import CliRunner

    from cli.app import app

    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return f"CRASH {type(res.exception).__name__}: {res.exception}"
    lines = [line.strip(" │╭╮╰╯─") for line in res.output.splitlines()]
    text = " ".join(" ".join(line for line in lines if line and not line.startswith(("Usage:", "Try "))).split())
    return f"exit {res.exit_code}: {text}"


def _header_file(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _big_header(scratch: Path) -> Path:
    """A 100 MB JSON header of plausible tensor entries (what made json.loads take 14-17 s and 1.9 GB), written in
    pieces so the probe's own memory stays small."""
    entry = '"t{}":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}'
    path = scratch / "big-header.safetensors"
    with path.open("wb") as f:
        f.write(b"\0" * 8 + b"{")
        i, size = 0, 1
        while size < HEADER_MB * 2**20:
            chunk = ",".join(entry.format(j, 4 * j, 4 * j + 4) for j in range(i, i + 10000)).encode()
            f.write(chunk if i == 0 else b"," + chunk)
            size += len(chunk) + 1
            i += 10000
        f.write(b"}")
        f.seek(0)
        f.write(struct.pack("<Q", size))
    return path


def _nested_header(scratch: Path) -> Path:
    return _header_file(scratch / "nested.safetensors", b'{"a": ' + b"[" * (NESTED_MB * 2**20))


def _tiny_model(scratch: Path) -> Path:
    from engine.random_checkpoint import write_random_sd1

    return Path(write_random_sd1(scratch / "tiny.safetensors", seed=0))


def baseline_generate(scratch: Path) -> str:
    """Not an abuse: one ordinary 64 px image, the reference for the others' seconds and memory."""
    return _cli("generate", "x", "--model", str(_tiny_model(scratch)), "--width", "64", "--height", "64", "--steps", "1",
                "--out", str(scratch / "out"))


def header_100mb_generate(scratch: Path) -> str:
    return _cli("generate", "x", "--model", str(_big_header(scratch)))


def header_100mb_models_inspect(scratch: Path) -> str:
    return _cli("models", "inspect", str(_big_header(scratch)))


def header_at_cap_models_inspect(scratch: Path) -> str:
    """The worst a header under the cap can cost: 16 MB of empty JSON objects, each a Python dict once parsed."""
    from engine.checkpoint import MAX_HEADER_BYTES

    count = (MAX_HEADER_BYTES - 16) // 3
    return _cli("models", "inspect", str(_header_file(scratch / "at-cap.safetensors", b'{"a":[' + b"{}," * count + b"{}]}")))


def nested_header_generate(scratch: Path) -> str:
    return _cli("generate", "x", "--model", str(_nested_header(scratch)))


def nested_header_models_inspect(scratch: Path) -> str:
    return _cli("models", "inspect", str(_nested_header(scratch)))


def nested_header_planning(scratch: Path) -> str:
    """Planning's model look-up (what ``adforge plan`` and ``run`` call for a row's model)."""
    from engine.checkpoint import CheckpointError
    from flows.model_registry import describe_model

    try:
        describe_model(_nested_header(scratch))
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    return "accepted"


def pickle_runs_code_allow_pickle(scratch: Path) -> str:
    import torch

    marker = scratch / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = scratch / "evil.ckpt"
    torch.save({"w": torch.zeros(1), "payload": RunsCode()}, evil)
    outcome = _cli("generate", "x", "--model", str(evil), "--allow-pickle")
    return ("CODE RAN; " if marker.exists() else "") + outcome


def size_100000_generate(scratch: Path) -> str:
    return _cli("generate", "x", "--model", str(_tiny_model(scratch)), "--width", "100000", "--height", "100000",
                "--out", str(scratch / "out"))


def seed_top_n2_generate(scratch: Path) -> str:
    return _cli("generate", "x", "--model", str(_tiny_model(scratch)), "--seed", str(2**63 - 1), "-n", "2",
                "--out", str(scratch / "out"))


def n_billion_generate(scratch: Path) -> str:
    return _cli("generate", "x", "--model", str(_tiny_model(scratch)), "-n", "1000000000", "--out", str(scratch / "out"))


def outpaint_huge_generate(scratch: Path) -> str:
    from PIL import Image

    src = scratch / "photo.png"
    Image.new("RGB", (64, 64)).save(src)
    return _cli("generate", "x", "--model", str(_tiny_model(scratch)), "--init-image", str(src),
                "--outpaint", "left:100000000", "--out", str(scratch / "out"))


PROBES: dict[str, Callable[[Path], str]] = {
    f"engine: {name}": fn
    for name, fn in {
        "baseline: generate 64x64, 1 step": baseline_generate,
        "safetensors header 100 MB -> generate": header_100mb_generate,
        "safetensors header 100 MB -> models inspect": header_100mb_models_inspect,
        "header of 16 MB of {} (at the cap) -> models inspect": header_at_cap_models_inspect,
        "nested [[[ header 10 MB -> generate": nested_header_generate,
        "nested [[[ header 10 MB -> models inspect": nested_header_models_inspect,
        "nested [[[ header 10 MB -> planning": nested_header_planning,
        "code-running .ckpt, --allow-pickle": pickle_runs_code_allow_pickle,
        "generate --width/--height 100000": size_100000_generate,
        "generate --seed 2**63-1 -n 2": seed_top_n2_generate,
        "generate -n 1000000000": n_billion_generate,
        "generate --outpaint left:100000000": outpaint_huge_generate,
    }.items()
}

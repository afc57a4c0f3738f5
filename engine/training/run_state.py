"""The resumable state every brand trainer keeps (LoRA, embedding, DreamBooth): the fingerprint that ties a state
folder to one training, the state file saved atomically and loaded on a restart, and the per-step bookkeeping
(losses, saves, callbacks) around it.

One implementation, so that "a killed run started again with the same ``state_dir`` ends with the very weights an
uninterrupted run ends with" holds alike for every trainer: the optimizer, the lr schedule, the one CPU generator
and the losses are saved and restored the same way; each trainer adds only its own weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

# Config fields that only say when to report: changing them must not make a state_dir refuse to resume.
NOT_IN_FINGERPRINT = ("save_every", "sample_every")


def config_fingerprint(config: Any, **identity: Any) -> str:
    """sha256 of the config's fields (less the reporting ones) and ``identity`` (resolution, image set, base model,
    ...: whatever else makes two trainings different)."""
    fields = {k: v for k, v in asdict(config).items() if k not in NOT_IN_FINGERPRINT}
    fields.update(identity)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def claim_state_dir(state_dir: Path, fingerprint_file: str, identity: str, record: Mapping[str, Any],
                    refusal: str) -> None:
    """Create ``state_dir`` and write the fingerprint file (with ``record`` beside it, for a person reading the
    folder), or check the one there: a folder of another training is refused with ``ValueError``, ``refusal``
    saying what may differ ("training (other settings, images or base model)")."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fp_path = state_dir / fingerprint_file
    if fp_path.exists():
        if json.loads(fp_path.read_text()).get("fingerprint") != identity:
            raise ValueError(f"{state_dir} holds the state of a different {refusal}; use a new state folder or "
                             "delete this one to start over")
        return
    tmp = fp_path.with_suffix(".part")
    tmp.write_text(json.dumps({"fingerprint": identity, **record}))
    os.replace(tmp, fp_path)  # atomic: a kill never leaves half a fingerprint that would refuse the resume


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file and rename, so a kill mid-write leaves the previous state whole."""
    tmp = path.with_suffix(".part")
    torch.save(state, tmp)
    os.replace(tmp, path)


class RunState:
    """The optimizer, lr schedule, generator, losses and clock of one training, saved to and resumed from
    ``path``. ``own_state()`` gives the trainer's own entries (its weights) at each save."""

    def __init__(self, path: Path, identity: str, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                 own_state: Callable[[], dict]) -> None:
        self.path, self.identity = path, identity
        self.opt, self.sched, self.gen = opt, sched, gen
        self.own_state = own_state
        self.losses: list[float] = []  # per step, every run of a resumed training included
        self.first = 0  # the step this run starts at (0 for a fresh run)
        self.earlier_seconds = 0.0  # training time of the earlier runs
        self.started_at = time.time()  # unix time of the first run's start
        self._start = time.perf_counter()

    def resume(self, map_location: torch.device | str | None = None) -> dict | None:
        """Restore the shared parts from the state file, if there is one, and return it for the trainer's own
        (its weights); None for a fresh run."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=True, map_location=map_location)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"].cpu())  # the generator is a CPU one whatever map_location says
        self.losses, self.first = list(state["losses"]), int(state["step"])
        self.earlier_seconds, self.started_at = float(state["seconds"]), float(state["started_at"])
        return state

    def start_clock(self) -> None:
        """Start timing this run (after loading and caching, which the earlier runs' seconds do not count either)."""
        self._start = time.perf_counter()

    def seconds(self) -> float:
        """Training time summed over all runs."""
        return self.earlier_seconds + time.perf_counter() - self._start

    def save(self, done: int) -> None:
        save_atomically({**self.own_state(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                         "gen": self.gen.get_state(), "losses": self.losses, "step": done,
                         "started_at": self.started_at, "seconds": self.seconds(), "fingerprint": self.identity},
                        self.path)

    def end_step(self, done: int, total: int, loss: float, *, save_every: int, sample_every: int,
                 on_step: Callable[[int, int, float], None] | None,
                 on_sample: Callable[[int], None] | None) -> None:
        """After step ``done`` (from 1): record the loss, save every ``save_every`` steps and at the end, then the
        callbacks. Saving comes first so an exception from a callback stops the run like a kill: the next call
        resumes from the state just saved."""
        self.losses.append(loss)
        if done % save_every == 0 or done == total:
            self.save(done)
        if on_step is not None:
            on_step(done, total, loss)
        if on_sample is not None and sample_every and done % sample_every == 0:
            with torch.no_grad():
                on_sample(done)

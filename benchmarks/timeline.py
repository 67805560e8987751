"""Where a trial's start-up time goes: the marks every process of a trial writes into one file
(:mod:`workers.marks`, on when ``HDET_TIMELINE`` names it), read back as phases.

The search marks its own steps; a training worker's marks come through its training hooks
(:mod:`workers.training.hooks`, entry :data:`HOOK`). Marks, in the order a trial passes them:

* ``trial_start`` (key: trial id): Tune has started the trial (its ``on_trial_start``: the trial's
  process is up, a new one or one Tune reuses).
* ``trial_fn`` (trial id): the trial function is called in that process.
* ``trainer_fit`` (run key): the trial calls ``fit()`` of a seed's trainer (its MLflow child run
  exists).
* ``worker_start`` (run key): rank 0's training function is called in its Ray Train worker.
* ``data_ready``, ``model_ready``: datasets and the (DDP-wrapped) model are built.
* ``first_step``: rank 0 starts its first training step (and every epoch's first step after it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from workers.marks import ENV, mark

__all__ = ["ENV", "HOOK", "PHASES", "read", "phases", "hook"]

#: the entry of ``HDET_TRAIN_HOOKS`` (:mod:`workers.training.hooks`) that marks a worker's phases.
HOOK = "benchmarks.timeline:hook"
#: The marks in trial order; :func:`phases` reports the time between consecutive ones.
PHASES = ("trial_start", "trial_fn", "trainer_fit", "worker_start", "data_ready", "model_ready", "first_step")


class _Marks:
    """The training loop's hook (:mod:`workers.training.hooks`): its phases as marks keyed by the run key."""

    def __init__(self, run_key: str):
        self.run_key = run_key

    def phase(self, label: str) -> None:
        mark(label, self.run_key)


def hook(run_key: str, rank: int) -> _Marks | None:
    """Rank 0's hook when ``HDET_TIMELINE`` is set (None otherwise)."""
    return _Marks(run_key) if rank == 0 and os.environ.get(ENV) else None


def read(path: str | Path) -> list[dict[str, Any]]:
    """The marks of a timeline file, in time order."""
    p = Path(path)
    if not p.exists():
        return []
    marks = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(marks, key=lambda m: m["t"])


def phases(marks: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per training run that reached its first step: seconds from each mark in :data:`PHASES` to
    the next, and ``total`` (``trial_start`` to ``first_step``).

    A run is matched to its trial by the run key's prefix (``<trial id>-seed``); runs that lack a
    mark (the baseline, which is not a Tune trial) are left out.
    """
    per_trial = ("trial_start", "trial_fn")
    trials: dict[str, dict[str, float]] = {}
    by_run: dict[str, dict[str, float]] = {}
    for m in marks:
        target = trials if m["label"] in per_trial else by_run
        target.setdefault(m["key"], {}).setdefault(m["label"], m["t"])
    out = []
    for key, t in by_run.items():
        trial = key.rsplit("-seed", 1)[0]
        if trial not in trials or "first_step" not in t:
            continue
        t = {**trials[trial], **t}
        if not all(label in t for label in PHASES):
            continue
        row = {f"{a}->{b}": t[b] - t[a] for a, b in zip(PHASES, PHASES[1:], strict=False)}
        row["total"] = t["first_step"] - t["trial_start"]
        out.append(row)
    return out

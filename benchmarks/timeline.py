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
* ``epochs_start``, ``epochs_done``, ``training_end``: the epochs begin; the last epoch's training
  and evaluation ended; its checkpoint, MLflow logging and plots too (the function returns).
* ``fit_end`` (run key): the seed's ``fit()`` returned in the search.

:func:`training_costs` reads a comparison's marks (``hdet bench experiment``): where the time of
its trainings' slots went besides their epochs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from workers.marks import ENV, mark

__all__ = ["ENV", "HOOK", "PHASES", "read", "phases", "hook", "training_costs"]

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


#: A training's fixed costs: the marks that bound each, in order (``hdet bench experiment``).
COSTS = (
    ("task start", "trainer_fit", "worker_start"),
    ("data and model", "worker_start", "model_ready"),
    ("optimizer, resume, MLflow start", "model_ready", "epochs_start"),
    ("checkpoint, MLflow, plots", "epochs_done", "training_end"),
    ("return to the search", "training_end", "fit_end"),
)


def training_costs(marks: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Where a comparison's time went besides its trainings' epochs, from the marks made between
    ``t0`` and ``t1`` (its start and end).

    Returns ``per_training``: for each of :data:`COSTS`, the median seconds over the trainings
    that have both marks; ``fixed_s``: their sum over every training (seconds of a slot);
    ``start_s``: ``t0`` to the first ``trainer_fit``; ``end_s``: the last ``fit_end`` to ``t1``;
    ``fits``: the trainings seen.
    """
    import statistics

    by_key: dict[str, dict[str, float]] = {}
    for m in marks:
        if t0 <= m["t"] <= t1:
            by_key.setdefault(m["key"], {}).setdefault(m["label"], m["t"])
    runs = {k: t for k, t in by_key.items() if "trainer_fit" in t and "fit_end" in t}
    per: dict[str, float] = {}
    fixed = 0.0
    for name, a, b in COSTS:
        spans = [t[b] - t[a] for t in runs.values() if a in t and b in t]
        per[name] = statistics.median(spans) if spans else float("nan")
        fixed += sum(spans)
    starts = [t["trainer_fit"] for t in runs.values()]
    ends = [t["fit_end"] for t in runs.values()]
    return {
        "per_training": per,
        "fixed_s": fixed,
        "start_s": (min(starts) - t0) if starts else float("nan"),
        "end_s": (t1 - max(ends)) if ends else float("nan"),
        "fits": len(runs),
    }

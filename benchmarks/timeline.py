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


#: A training's fixed costs inside its task: the marks that bound each (``hdet bench experiment``).
COSTS = (
    ("data and model", "worker_start", "model_ready"),
    ("optimizer, resume, MLflow start", "model_ready", "epochs_start"),
    ("checkpoint, MLflow, plots", "epochs_done", "training_end"),
)


def training_costs(marks: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Where a comparison's slots spent its time, from the marks made between ``t0`` and ``t1``
    (its start and end): a training occupies a slot from ``worker_start`` (its task began) to
    ``training_end`` (its function returned), the rest of a slot's time is idle.

    Returns ``fits`` (trainings with both marks); ``occupied_s`` (their slot time, summed),
    ``epochs_s`` (``epochs_start`` to ``epochs_done``, summed) and ``fixed_s`` (the rest of
    ``occupied_s``); ``per_training``: for each of :data:`COSTS`, the median seconds;
    ``start_s``: ``t0`` to the first ``worker_start``; ``end_s``: the last ``training_end`` to ``t1``.
    """
    import statistics

    by_key: dict[str, dict[str, float]] = {}
    for m in marks:
        if t0 <= m["t"] <= t1:
            by_key.setdefault(m["key"], {}).setdefault(m["label"], m["t"])
    runs = [t for t in by_key.values() if "worker_start" in t and "training_end" in t]
    occupied = sum(t["training_end"] - t["worker_start"] for t in runs)
    epochs = sum(
        t["epochs_done"] - t["epochs_start"] for t in runs if "epochs_start" in t and "epochs_done" in t
    )
    per = {}
    for name, a, b in COSTS:
        spans = [t[b] - t[a] for t in runs if a in t and b in t]
        per[name] = statistics.median(spans) if spans else float("nan")
    nan = float("nan")
    return {
        "fits": len(runs),
        "occupied_s": occupied,
        "epochs_s": epochs,
        "fixed_s": occupied - epochs,
        "per_training": per,
        "start_s": min(t["worker_start"] for t in runs) - t0 if runs else nan,
        "end_s": t1 - max(t["training_end"] for t in runs) if runs else nan,
    }

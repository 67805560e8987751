"""Where a trial's start-up time goes: time marks from every process of a trial, into one file.

Off unless ``HDET_TIMELINE`` names a file (``hdet bench search`` sets it for its local Ray, whose
processes inherit it). A training worker's marks come through its training hooks
(:mod:`workers.hooks`, entry :data:`HOOK`). Each mark is a JSON line ``{"t", "pid", "label", "key"}``; ``key`` is the
training run's MLflow run key (``<trial id>-seed<seed>``) or the trial id, so marks of concurrent
trials can be told apart. Appends of one short line are atomic on a local file system.

Marks, in the order a trial passes them:

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
import time
from pathlib import Path
from typing import Any

__all__ = ["ENV", "HOOK", "PHASES", "mark", "set_key", "read", "phases", "hook"]

ENV = "HDET_TIMELINE"
#: the entry of ``HDET_TRAIN_HOOKS`` (:mod:`workers.hooks`) that marks a worker's phases.
HOOK = "workers.timeline:hook"
#: The marks in trial order; :func:`phases` reports the time between consecutive ones.
PHASES = ("trial_start", "trial_fn", "trainer_fit", "worker_start", "data_ready", "model_ready", "first_step")

_key = ""


def set_key(key: str) -> None:
    """The key of the marks this process makes from now on (a worker's run key)."""
    global _key
    _key = key


def mark(label: str, key: str | None = None, t: float | None = None) -> None:
    """Record ``label`` at ``t`` (default now), if ``HDET_TIMELINE`` is set (a no-op otherwise)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps(
        {
            "t": time.time() if t is None else t,
            "pid": os.getpid(),
            "label": label,
            "key": _key if key is None else key,
        }
    )
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class _Marks:
    """The training loop's hook (:mod:`workers.hooks`): its phases as marks keyed by the run key."""

    def __init__(self, run_key: str):
        set_key(run_key)

    def phase(self, label: str) -> None:
        mark(label)


def hook(run_key: str) -> _Marks | None:
    """The worker's hook when ``HDET_TIMELINE`` is set (None otherwise)."""
    return _Marks(run_key) if os.environ.get(ENV) else None


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

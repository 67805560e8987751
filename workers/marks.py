"""Time marks of a search's start-up: where a trial's time goes before its first training step.

Off unless ``HDET_TIMELINE`` names a file (``hdet bench search`` sets it for its local Ray, whose
processes inherit it); then :func:`mark` appends one JSON line ``{"t", "pid", "label", "key"}``
(appends of one short line are atomic on a local file system). ``key`` tells concurrent trials
apart: the trial id, or a training run's MLflow run key (``<trial id>-seed<seed>``).

The search marks ``trial_start`` (its Tune callback), ``trial_fn`` (the trial function is called)
``trainer_fit`` (a seed's trainer starts) and ``fit_end`` (its ``fit()`` returned); a training worker's
phases come through its hooks
(:mod:`workers.training.hooks`). The benchmark reads the file back (``benchmarks.timeline``): the marks are
made in Tune's driver and trial processes, which load no training hooks, so a writer this small
is the whole seam between the search and the benchmark.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["ENV", "enabled", "mark"]

ENV = "HDET_TIMELINE"


def enabled() -> bool:
    """Whether marks are kept (``HDET_TIMELINE`` names a file)."""
    return bool(os.environ.get(ENV))


def mark(label: str, key: str, t: float | None = None) -> None:
    """Record ``label`` of ``key`` at ``t`` (default now), if ``HDET_TIMELINE`` is set (a no-op otherwise)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time() if t is None else t, "pid": os.getpid(), "label": label, "key": key})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")

"""Fault injection for the tests of recovery and failure, through the training loop's hooks
(:mod:`workers.training.hooks`): a rank that exits its process once, a training that hangs once, a
loss term made infinite at a step.

The faults are a plan: a JSON file named by ``HDET_FAULTS`` that every worker reads when it starts
(no file: no fault and no hook, so the loop makes no per-step call). :func:`installed` sets what a
local Ray started in its block must inherit: the hook entries :data:`HOOKS`, ``HDET_FAULTS``, and
this folder on ``PYTHONPATH`` (Ray's workers import the hooks by module name, and pytest puts
``tests/`` on the path of its own process only). :func:`planned` writes a plan for a block, so
several runs on one Ray can each have their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.training import hooks

__all__ = ["ENV", "HOOKS", "Plan", "installed", "planned", "crash", "hang", "nonfinite"]

ENV = "HDET_FAULTS"
#: the entries of ``HDET_TRAIN_HOOKS``: each factory reads the plan, and gives no hook without its fault.
HOOKS = "faults:crash,faults:hang,faults:nonfinite"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Plan:
    """The faults of the trainings started while the plan file exists."""

    #: this rank exits its process once, at the start of epoch ``crash_after_epoch + 1`` (after
    #: epoch ``crash_after_epoch``'s checkpoint); ``crash_marker`` records that it did.
    crash_rank: int | None = None
    crash_after_epoch: int = 1
    crash_marker: str | None = None
    #: on every rank, the first loss term (by name) is made infinite at this global step (0-based).
    nonfinite_step: int | None = None
    #: the first training to start epoch ``hang_after_epoch + 1`` whose run key starts with none of
    #: ``hang_skip`` waits there (until its process is killed); ``hang_marker`` records that it did.
    hang_after_epoch: int | None = None
    hang_marker: str | None = None
    hang_skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.crash_rank is not None and not self.crash_marker:
            raise ValueError("crash_marker: required with crash_rank (the crash must happen only once)")
        if self.hang_after_epoch is not None and not self.hang_marker:
            raise ValueError("hang_marker: required with hang_after_epoch (the hang must happen only once)")


def _plan() -> Plan | None:
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return None
    data = json.loads(Path(path).read_text())
    return Plan(**{**data, "hang_skip": tuple(data.get("hang_skip") or ())})


@contextlib.contextmanager
def installed(plan_file: Path) -> Iterator[None]:
    """The fault hooks, reading ``plan_file``, for a local Ray started in the block (the environment
    is restored afterwards)."""
    saved = {k: os.environ.get(k) for k in (ENV, "PYTHONPATH")}
    os.environ[ENV] = str(plan_file)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_HERE), saved["PYTHONPATH"]]))
    try:
        with hooks.installed(HOOKS):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def planned(plan_file: Path, **faults: Any) -> Iterator[Plan]:
    """``faults`` (the fields of :class:`Plan`) written to ``plan_file`` for the block."""
    plan = Plan(**faults)
    plan_file.write_text(json.dumps(dataclasses.asdict(plan)))
    try:
        yield plan
    finally:
        plan_file.unlink(missing_ok=True)


class _Crash:
    def __init__(self, rank: int, epoch: int, marker: Path):
        self.rank, self.epoch, self.marker = rank, epoch, marker

    def epoch_start(self, epoch: int) -> None:
        """Exit the process if this is the crash epoch and the marker says it has not happened yet."""
        if epoch != self.epoch or self.marker.exists():
            return
        self.marker.write_text(f"rank {self.rank} exited at epoch {epoch}\n")
        # Let the controller collect the last report first: it polls the workers every 2 s, and a
        # report still waiting in a dead worker is lost (the run would then resume from the
        # checkpoint before it, which is correct but not the recovery under test).
        time.sleep(5.0)
        sys.stdout.write(f"[faults] rank {self.rank} exits on purpose at epoch {epoch}\n")
        sys.stdout.flush()
        os._exit(1)


class _Hang:
    def __init__(self, key: str, epoch: int, marker: Path):
        self.key, self.epoch, self.marker = key, epoch, marker

    def epoch_start(self, epoch: int) -> None:
        """Wait here for good if this is the hang epoch and no training has hung yet."""
        if epoch != self.epoch:
            return
        try:
            with self.marker.open("x") as f:  # only the first training to get here hangs
                f.write(f"{self.key} hangs at the start of epoch {epoch}\n")
        except FileExistsError:
            return
        while True:
            time.sleep(1.0)


class _NonFinite:
    def __init__(self, step: int):
        self.step = step

    def step_losses(self, step: int, losses: dict[str, Any]) -> dict[str, Any] | None:
        if step != self.step:
            return None
        first = sorted(losses)[0]
        return {**losses, first: losses[first] * float("inf")}


def crash(run_key: str, rank: int) -> _Crash | None:
    """The hook that makes ``rank`` exit once, if the plan says so."""
    plan = _plan()
    if plan is None or plan.crash_rank != rank or plan.crash_marker is None:
        return None
    return _Crash(rank, plan.crash_after_epoch + 1, Path(plan.crash_marker))


def hang(run_key: str, rank: int) -> _Hang | None:
    """The hook that makes a training wait for good once, if the plan says so."""
    plan = _plan()
    if plan is None or plan.hang_after_epoch is None or plan.hang_marker is None or rank != 0:
        return None
    if run_key.startswith(plan.hang_skip):
        return None
    return _Hang(run_key, plan.hang_after_epoch + 1, Path(plan.hang_marker))


def nonfinite(run_key: str, rank: int) -> _NonFinite | None:
    """The hook that makes a loss term infinite, if the plan says so."""
    plan = _plan()
    return None if plan is None or plan.nonfinite_step is None else _NonFinite(plan.nonfinite_step)

"""Callbacks into a training worker's loop: the one way anything that is not training (the
benchmarks' turns and start-up marks, progress reporting, the tests' fault injection) acts inside
it. The loop calls them and knows none of them.

A hook is an object with any of these methods; the loop calls those it has:

* ``phase(label)``: the worker reached ``label`` (``worker_start``, ``data_ready``, ``model_ready``;
  ``epochs_start``: before the first epoch; ``first_step``: every epoch's first step, the reader
  keeps the first; ``epochs_done``: the last epoch's training and evaluation ended;
  ``training_end``: its checkpoint, MLflow logging and plots too).
* ``train_start()``: before the first epoch.
* ``epoch_start(epoch)``: before epoch ``epoch``'s training pass (1-based; a resumed worker starts
  after its checkpoint's epoch).
* ``step_losses(step, losses) -> dict | None``: the loss terms of global step ``step`` (0-based),
  before the loop checks that they are finite and sums them; a dict returned replaces them.
* ``step_end(epoch, seconds, images, last) -> bool``: a training step of ``seconds`` ended
  (``last``: the epoch's last); True when the hook held the worker afterwards, so the loop's clock
  for its next step starts again.

The loop calls the per-step methods only when some hook has them (:attr:`TrainHooks.on_steps`,
:attr:`TrainHooks.on_losses`): with no such hook a step costs what it costs without hooks.

Hooks are named in ``HDET_TRAIN_HOOKS`` (``module:factory`` entries separated by commas). Every
worker calls each factory with the run key and its rank; a factory returns a hook, or None when it
has nothing to do on that rank (the benchmarks' hooks act on rank 0 only). The process that starts
a local Ray sets the variable (``hdet bench`` does, and the tests' ``tests/faults.py``), and Ray's
worker processes inherit it; the modules are imported in the worker by name.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["ENV", "TrainHooks", "load", "installed"]

ENV = "HDET_TRAIN_HOOKS"


class TrainHooks:
    """The hooks of one worker, dispatched by method (no hook: every call is a no-op)."""

    def __init__(self, hooks: Sequence[Any] = ()):
        self._phase = [h.phase for h in hooks if hasattr(h, "phase")]
        self._start = [h.train_start for h in hooks if hasattr(h, "train_start")]
        self._epoch = [h.epoch_start for h in hooks if hasattr(h, "epoch_start")]
        self._losses = [h.step_losses for h in hooks if hasattr(h, "step_losses")]
        self._step = [h.step_end for h in hooks if hasattr(h, "step_end")]

    @property
    def on_steps(self) -> bool:
        """Whether any hook wants every step's end (the loop skips :meth:`step_end` otherwise)."""
        return bool(self._step)

    @property
    def on_losses(self) -> bool:
        """Whether any hook wants every step's losses (the loop skips :meth:`step_losses` otherwise)."""
        return bool(self._losses)

    def phase(self, label: str) -> None:
        for f in self._phase:
            f(label)

    def train_start(self) -> None:
        for f in self._start:
            f()

    def epoch_start(self, epoch: int) -> None:
        for f in self._epoch:
            f(epoch)

    def step_losses(self, step: int, losses: dict[str, Any]) -> dict[str, Any]:
        """``losses`` as the hooks leave them, each in turn given what the one before returned."""
        for f in self._losses:
            replaced = f(step, losses)
            if replaced is not None:
                losses = replaced
        return losses

    def step_end(self, epoch: int, seconds: float, images: int, *, last: bool) -> bool:
        held = False
        for f in self._step:
            held = bool(f(epoch, seconds, images, last=last)) or held
        return held


def load(run_key: str, rank: int, names: str | None = None) -> TrainHooks:
    """The hooks ``names`` (default ``$HDET_TRAIN_HOOKS``) of rank ``rank`` of the run ``run_key``.

    Raises:
        ValueError: an entry that is not ``module:factory``, or names nothing importable.
    """
    entries = [e.strip() for e in (os.environ.get(ENV, "") if names is None else names).split(",")]
    hooks = []
    for entry in filter(None, entries):
        module, sep, attr = entry.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"{ENV}: {entry!r} is not module:factory")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{ENV}: cannot load {entry!r} ({e})") from None
        hook = factory(run_key, rank)
        if hook is not None:
            hooks.append(hook)
    return TrainHooks(hooks)


@contextlib.contextmanager
def installed(entry: str) -> Iterator[None]:
    """``entry`` added to ``$HDET_TRAIN_HOOKS`` for the block (a local Ray started in it inherits it)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = ",".join(filter(None, [before, entry]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before

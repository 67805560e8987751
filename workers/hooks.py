"""Callbacks into a training worker's loop: the one way anything that is not training (the
benchmarks' turns and start-up marks, progress reporting) acts inside it. The loop calls them and
knows none of them.

A hook is an object with any of these methods; the loop calls those it has, on rank 0:

* ``phase(label)``: the worker reached ``label`` (``worker_start``, ``data_ready``, ``model_ready``,
  ``first_step``: every epoch's first step, the reader keeps the first).
* ``train_start()``: before the first epoch.
* ``step_end(epoch, seconds, images, last) -> bool``: a training step of ``seconds`` ended
  (``last``: the epoch's last); True when the hook held the worker afterwards, so the loop's clock
  for its next step starts again.

Hooks are named in ``HDET_TRAIN_HOOKS`` (``module:factory`` entries separated by commas). Each
factory is called with the run key and returns a hook, or None when it has nothing to do. The
process that starts a local Ray sets the variable (``hdet bench`` does), and Ray's worker
processes inherit it.
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
        self._step = [h.step_end for h in hooks if hasattr(h, "step_end")]

    @property
    def on_steps(self) -> bool:
        """Whether any hook wants every step (the loop skips the call otherwise)."""
        return bool(self._step)

    def phase(self, label: str) -> None:
        for f in self._phase:
            f(label)

    def train_start(self) -> None:
        for f in self._start:
            f()

    def step_end(self, epoch: int, seconds: float, images: int, *, last: bool) -> bool:
        held = False
        for f in self._step:
            held = bool(f(epoch, seconds, images, last=last)) or held
        return held


def load(run_key: str, names: str | None = None) -> TrainHooks:
    """The hooks ``names`` (default ``$HDET_TRAIN_HOOKS``) for the training run ``run_key``.

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
        hook = factory(run_key)
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

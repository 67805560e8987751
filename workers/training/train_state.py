"""A training run's checkpointed train state: what an epoch's checkpoint holds, saved and loaded
as one pair (model, optimizer, scheduler, AMP scaler, epoch, metric history, best epoch, spec).

``FailureConfig(max_failures)`` restarts the workers from the latest such checkpoint; a run
started with ``resume_from`` loads one when Ray has none of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from workers.spec import Spec

__all__ = ["STATE_FILE", "TrainParts", "Progress", "save_train_state", "load_train_state", "checkpoint_dir"]

#: The train state's file in a checkpoint directory.
STATE_FILE = "state.pt"


class TrainParts(NamedTuple):
    """What a checkpoint restores: the (unwrapped) model, optimizer, LR scheduler and AMP scaler."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any


def _no_best() -> dict[str, Any]:
    return {"AP": -math.inf, "epoch": 0}


@dataclass
class Progress:
    """How far a run got: last finished ``epoch`` (0: none), the per-epoch metric ``history``
    (rank 0) and the ``best`` epoch by AP (``{"AP", "epoch"}``)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_no_best)


def save_train_state(directory: Path, parts: TrainParts, progress: Progress, spec: Spec) -> None:
    """Write the train state to ``directory / STATE_FILE``."""
    import torch

    torch.save(
        {
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "epoch": progress.epoch,
            "history": progress.history,
            "best": progress.best,
            "spec": spec.to_dict(),
        },
        directory / STATE_FILE,
    )


def load_train_state(directory: Path, parts: TrainParts) -> Progress:
    """Load ``directory / STATE_FILE`` into ``parts``; the progress it records."""
    import torch

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    return Progress(int(state["epoch"]), list(state["history"]), dict(state["best"]))


def checkpoint_dir(checkpoint: Any, resume_from: str | None) -> AbstractContextManager[str] | None:
    """The directory to resume from, as a context manager: Ray's own ``checkpoint`` of this run,
    else ``resume_from``, else None."""
    if checkpoint:
        return checkpoint.as_directory()  # type: ignore[no-any-return]
    return _plain_dir(resume_from) if resume_from else None


@contextmanager
def _plain_dir(path: str) -> Iterator[str]:
    yield path
